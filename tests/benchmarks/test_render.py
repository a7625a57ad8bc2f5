"""benchmarks/render.py writes docs/benchmarks.md from the benchmarks' JSON: a targets table
with a verdict per ratio (a straddled target said as such), a section per script (not run
without its JSON, old format without ratios or tables), and the same page on every call; the
page in the repository is what it writes from the committed JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import render  # noqa: E402
from shared import ratio  # noqa: E402

SCRIPT = '''"""{first}

More that the page leaves out.

    python benchmarks/{name}.py            # the full run
    python benchmarks/{name}.py --quick    # smoke run
"""
'''

MACHINE = {
    "date": "2026-12-07T08:00:00+00:00",
    "torch": "2.13.0+cpu",
    "python": "3.11.7",
    "cores": 2,
    "load_average_at_end": [3.25, 2.5, 1.75],
}


def fixtures(
    tmp_path: Path, results: dict[str, dict[str, Any]], scripts: dict[str, str]
) -> tuple[Path, Path]:
    bench, out = tmp_path / "benchmarks", tmp_path / "results"
    bench.mkdir()
    out.mkdir()
    for name in ("shared", "render"):  # not benchmarks: no section
        (bench / f"{name}.py").write_text('"""Not a benchmark."""\n')
    for name, first in scripts.items():
        (bench / f"{name}.py").write_text(SCRIPT.format(first=first, name=name))
    for name, data in results.items():
        (out / f"{name}.json").write_text(json.dumps(data))
    return bench, out


@pytest.fixture
def page(tmp_path: Path) -> str:
    meets = ratio("fused / loop", [3.5, 4.0, 3.2, 3.6, 3.3], [1.0] * 5, target=3, workload="CNN", K=16)
    straddles = ratio(
        "batched / sequential", [9.0, 11.0, 10.5, 12.0, 8.0], [1.0] * 5, target=10, workload="MLP"
    )
    at_most = ratio(
        "sync / all-reduce", [1.2, 1.3, 1.25, 1.4, 1.22], [1.0] * 5, target=1.05, at_most=True, K=2
    )
    plain = ratio("A/A", [1.0, 1.01, 0.99, 1.02, 0.98], [1.0] * 5)
    alpha = {
        "command": ["/some/venv/bin/python", "benchmarks/alpha.py"],
        "machine": MACHINE,
        "ratios": [meets, straddles, at_most, plain],
        "tables": [
            {
                "title": "Samples per second",
                "columns": ["workload", "K", "fused / loop"],
                "rows": [["CNN", 16, "3.50 [3.20, 4.00]"], ["MLP | wide", 4, 0.123456]],
                "note": "One thread; the machine was shared.",
            }
        ],
    }
    old = {"date": "2026-11-21T22:22:32+00:00", "machine": {"cpus": 2}, "results": {"x": 1.0}}
    legacy = {"machine": MACHINE, "table": ["| runs | kills |", "|---|---|", "| 100 | 20 |"]}
    bench, out = fixtures(
        tmp_path,
        {"alpha": alpha, "beta": old, "delta": legacy},
        {
            "alpha": "Alpha measures the ``fused`` path against :class:`~pkg.Loop`.",
            "beta": "Beta, written before ratios.",
            "gamma": "Gamma, never run here.",
            "delta": "Delta, a soak.",
        },
    )
    text = render.render(bench, out)
    assert render.render(bench, out) == text  # deterministic
    return text


def section(page: str, name: str) -> str:
    return page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]


def test_the_targets_table_has_a_row_per_ratio_with_a_target_and_its_verdict(page: str) -> None:
    targets = section(page, "Targets")
    rows = [line for line in targets.splitlines() if line.startswith("| [")]
    assert rows == [
        "| [alpha](#alpha) | fused / loop (workload CNN, K 16) | >= 3 | 3.500 | [3.200, 4.000] | 5 | meets "
        "| 2026-12-07 08:00 UTC | 3.2 |",
        "| [alpha](#alpha) | batched / sequential (workload MLP) | >= 10 | 10.5 | [8.000, 12.0] | 5 "
        "| straddles: meets in median only | 2026-12-07 08:00 UTC | 3.2 |",
        "| [alpha](#alpha) | sync / all-reduce (K 2) | <= 1.05 | 1.250 | [1.200, 1.400] | 5 | misses "
        "| 2026-12-07 08:00 UTC | 3.2 |",
    ]
    assert "A/A" not in targets  # no target, not a target row
    assert "[beta](#beta) (old format: rerun)" in targets and "[gamma](#gamma) (not run)" in targets


def test_a_section_gives_what_how_the_machine_its_tables_and_every_ratio(page: str) -> None:
    alpha = section(page, "alpha")
    assert "`benchmarks/alpha.py`: Alpha measures the `fused` path against `pkg.Loop`." in alpha
    assert "More that the page leaves out" not in alpha
    assert "python benchmarks/alpha.py --quick    # smoke run" in alpha
    assert (
        "This run: `python benchmarks/alpha.py`, ended 2026-12-07 08:00 UTC; torch 2.13.0+cpu, 2 cores, "
        "load average 3.2, 2.5, 1.8 at the end (1, 5, 15 min)." in alpha
    )
    assert "**Samples per second**" in alpha and "| workload | K | fused / loop |" in alpha
    assert "| MLP \\| wide | 4 | 0.123 |" in alpha  # a cell's bar escaped, a float rounded
    assert "One thread; the machine was shared." in alpha
    assert "| A/A | 1.000 [0.980, 1.020] (5) |  |  |" in alpha
    assert (
        "| batched / sequential (workload MLP) | 10.5 [8.000, 12.0] (5) | >= 10 | straddles: meets in median only |"
        in alpha
    )


def test_a_missing_json_is_not_run_and_an_old_one_says_to_rerun(page: str) -> None:
    assert "**Not run**: there is no `benchmarks/results/gamma.json`." in section(page, "gamma")
    beta = section(page, "beta")
    assert "**Old format**" in beta and "rerun `python benchmarks/beta.py`" in beta
    assert "ended 2026-11-21 22:22 UTC" in beta and "load average not recorded" in beta
    delta = section(page, "delta")  # a Markdown table of an older JSON is still shown
    assert "| runs | kills |" in delta and "| 100 | 20 |" in delta and "Old format" not in delta
    assert "## shared" not in page and "## render" not in page


def test_a_results_file_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    bench, out = fixtures(tmp_path, {}, {"alpha": "Alpha."})
    (out / "alpha.json").write_text("[1, 2]")
    with pytest.raises(
        ValueError, match=r"alpha\.json: a benchmark's results must be a JSON object, not list"
    ):
        render.render(bench, out)


def test_docs_benchmarks_md_is_what_render_writes_from_the_committed_json() -> None:
    assert (ROOT / "docs" / "benchmarks.md").read_text() == render.render(), (
        "docs/benchmarks.md is generated: run `make bench-docs` (python benchmarks/render.py), do not edit it"
    )
