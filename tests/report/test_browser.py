"""report.html in a real headless browser: it renders its figures and tables, and no mean ± std
cell wraps, at 800 and 1400 pixels wide. Chromium from the distribution (``.ci/run``
installs it); the test skips, saying why, where no Chromium can run."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

WIDTHS = (800, 1400)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run")

# Run inside the page once it has loaded: what the layout engine made of it.
PROBE = """
<script>
window.addEventListener("load", () => {
  const lines = (td) => {
    const range = document.createRange();
    range.selectNodeContents(td);
    return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
  };
  const cells = [...document.querySelectorAll("td")].filter((td) => td.textContent.includes("±"));
  const images = [...document.images];
  const probe = {
    viewport: window.innerWidth,
    images: images.length,
    decoded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    shown: images.filter((i) => i.getBoundingClientRect().width > 100).length,
    overflowing: images.filter((i) => i.getBoundingClientRect().right > window.innerWidth + 1).length,
    tables: document.querySelectorAll("table").length,
    pm_cells: cells.length,
    wrapped: cells.filter((td) => lines(td) > 1).map((td) => td.textContent),
    contents: document.querySelectorAll("nav.toc a").length,
  };
  document.body.setAttribute("data-probe", JSON.stringify(probe));
});
</script>
"""


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    try:
        done = subprocess.run(
            [found, *FLAGS, "--dump-dom", "about:blank"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Chromium cannot run here: {exc}")
    if done.returncode != 0 or "<html" not in done.stdout:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"Chromium cannot run here: {last}")
    return found


def _run(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([browser, *FLAGS, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _probe(browser: str, page: Path, width: int) -> dict[str, Any]:
    done = _run(
        browser, f"--window-size={width},1200", "--virtual-time-budget=15000", "--dump-dom", page.as_uri()
    )
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, "the page's load handler did not run"
    return dict(json.loads(html.unescape(found.group(1))))


@pytest.mark.parametrize("width", WIDTHS)
def test_the_page_renders_its_figures_and_tables_without_wrapped_cells(
    chromium: str, report: tuple[Path, dict[str, Path]], tmp_path: Path, width: int
) -> None:
    _, paths = report
    page = tmp_path / "report.html"
    page.write_text(paths["html"].read_text().replace("</body>", PROBE + "</body>"))
    figures = len([k for k in paths if k.endswith(".png")])
    probe = _probe(chromium, page, width)
    assert probe["viewport"] == width
    assert probe["images"] == probe["decoded"] == probe["shown"] == figures
    assert probe["overflowing"] == 0
    assert probe["tables"] >= 2 and probe["pm_cells"] > 0
    assert probe["wrapped"] == [], f"± cells wrapped at {width} px"
    assert probe["contents"] >= 6

    shot = tmp_path / f"report-{width}.png"
    _run(chromium, f"--window-size={width},3000", f"--screenshot={shot}", paths["html"].as_uri())
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (width, 3000)
        pixels = image.convert("RGB")
        # The figures are drawn: many distinct colours, far from a blank or text-only page.
        colours = {c for _, c in pixels.getcolors(maxcolors=1 << 20) or []}
        assert len(colours) > 500, len(colours)
        # Family colours (saturated) appear, not only the greys of text and rules.
        saturated = sum(1 for r, g, b in colours if max(r, g, b) - min(r, g, b) > 80)
        assert saturated > 50, saturated
