"""The report is its sections: a new one is one module and its line in SECTIONS, and its
block, figure and sheet reach report.md, report.html, the figure files and results.xlsx;
a figure's stem and a sheet's name belong to one section."""

from __future__ import annotations

import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from localsgd.report import graphics, make_report, sections
from localsgd.report.build import context
from localsgd.report.render import Heading, Paragraph
from localsgd.report.section import Context, Drawing, Parts, Shown
from localsgd.report.workbook import Sheet
from report.stores import build_estimate_store, build_store
from report.test_hk import FINALS
from report.test_hk import _store as build_hk_store
from report.test_measured import CLUSTER
from report.test_measured import build as build_measured_store
from report.test_switch import build_switch_store

openpyxl = pytest.importorskip("openpyxl")

# -- a toy section: this module's ``parts`` ------------------------------------------------


def _runs_per_k(ctx: Context) -> graphics.Plot:
    counts = ctx.study.runs["workers"].value_counts().sort_index()
    fig = Figure(figsize=(4, 3), layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots().bar([str(k) for k in counts.index], counts.to_numpy())
    return graphics.Plot(fig)


def parts(ctx: Context) -> Parts:
    """The runs per worker count K: a paragraph, a bar chart, a sheet; and a figure with
    nothing to draw."""
    counts = ctx.study.runs.groupby("workers").size().rename("runs").reset_index()
    drawn = Drawing("toy_runs_per_k", "Runs per worker count K (all statuses)", lambda: _runs_per_k(ctx))
    empty = Drawing(
        "toy_nothing", "Nothing at all (toy)", lambda: graphics.Plot(None, {"mnist1d_cnn": "no toy data"})
    )
    return Parts(
        [
            Heading(2, "Toy"),
            Paragraph(f"Toy: {len(ctx.study.runs)} finished runs."),
            Shown(drawn),
            Shown(empty),
        ],
        {"toy": Sheet(counts, "workers")},
    )


TOY = sys.modules[__name__]


def with_toy(before: str) -> tuple[Any, ...]:
    """SECTIONS with the toy's one line added in front of the section named ``before``."""
    names = [s.__name__.rsplit(".", 1)[-1] for s in sections.SECTIONS]
    at = names.index(before)
    return (*sections.SECTIONS[:at], TOY, *sections.SECTIONS[at:])


def test_a_section_is_one_module_and_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_store(tmp_path / "store")
    monkeypatch.setattr(sections, "SECTIONS", with_toy(before="status"))
    paths = make_report(tmp_path / "store", tmp_path / "out", formats="png,svg", dpi=60)

    assert {"toy_runs_per_k.png", "toy_runs_per_k.svg"} <= set(paths)
    assert paths["toy_runs_per_k.png"].read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in paths["toy_runs_per_k.svg"].read_bytes()
    assert not any(name.startswith("toy_nothing") for name in paths)
    assert not any(p.name.startswith("toy_nothing") for p in (tmp_path / "out").iterdir())

    text = paths["markdown"].read_text()
    # Where its line puts it: right before the run status.
    assert text.index("## Communication") < text.index("## Toy") < text.index("## Run status")
    toy = text.split("## Toy")[1].split("## Run status")[0]
    assert "Toy: 10 finished runs." in toy
    assert "![Runs per worker count K (all statuses)](toy_runs_per_k.png)" in toy
    assert "No figure “Nothing at all”: no toy data." in toy
    assert "- [Toy](#toy)" in text
    files = text.split("## Files")[1]
    assert "Runs per worker count K: [PNG](toy_runs_per_k.png) · [SVG](toy_runs_per_k.svg)" in files
    assert "toy_nothing" not in files

    page = paths["html"].read_text()
    assert '<h2 id="toy">Toy</h2>' in page
    assert '<figure id="fig-toy_runs_per_k"><img alt="Runs per worker count K (all statuses)" ' in page
    assert page.index('id="toy"') < page.index('id="fig-toy_runs_per_k"') < page.index('id="run-status"')

    book = openpyxl.load_workbook(paths["xlsx"])
    assert book.sheetnames == ["summary", "status", "baseline", "runs", "metrics", "toy", "units"]
    rows = list(book["toy"].iter_rows(values_only=True))
    assert rows == [("workers", "runs"), (1, 3), (2, 7)]


def test_a_stem_drawn_by_two_sections_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_store(tmp_path / "store")
    copy = types.ModuleType("copy_of_curves")
    copy.parts = lambda ctx: Parts([Shown(Drawing("metric_vs_epochs", "again", lambda: graphics.Plot(None)))])
    monkeypatch.setattr(sections, "SECTIONS", (*sections.SECTIONS, copy))
    with pytest.raises(
        AssertionError, match=r"'metric_vs_epochs' is drawn by both .*curves and copy_of_curves"
    ):
        make_report(tmp_path / "store", tmp_path / "out", formats="png")
    assert not (tmp_path / "out").exists()


def _stores(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Stores that between them call for every section that draws, with the options that
    do: a cluster, a target."""
    build_store(root / "plain")
    build_estimate_store(root / "estimates")
    build_measured_store(root / "measured")
    build_hk_store(root / "hk", FINALS)
    build_switch_store(root / "switch")
    return [
        (root / "plain", {}),
        (root / "estimates", {"cluster": "10gbe", "target": "accuracy=0.85"}),
        (root / "measured", {"cluster": CLUSTER}),
        (root / "hk", {}),
        (root / "switch", {}),
    ]


def test_no_two_sections_draw_the_same_stem_or_write_the_same_sheet(tmp_path: Path) -> None:
    stems: dict[str, set[str]] = defaultdict(set)
    sheets: dict[str, set[str]] = defaultdict(set)
    for store, options in _stores(tmp_path):
        ctx = context(store, **options)
        for section in sections.SECTIONS:
            made = section.parts(ctx)
            name = getattr(section, "__name__", "").rsplit(".", 1)[-1]
            for drawing in made.figures:
                stems[drawing.stem].add(name)
            for sheet in made.sheets:
                sheets[sheet].add(name)
    assert {stem: owners for stem, owners in stems.items() if len(owners) > 1} == {}
    assert {sheet: owners for sheet, owners in sheets.items() if len(owners) > 1} == {}
    drawing = set().union(*stems.values())
    assert drawing >= {
        "speedup",
        "curves",
        "communication",
        "cluster",
        "steps_to_result",
        "measured",
        "hk",
        "switch_point",
    }
    assert len(stems) >= 18
    assert list(sheets)[:5] == ["summary", "status", "baseline", "runs", "metrics"]
