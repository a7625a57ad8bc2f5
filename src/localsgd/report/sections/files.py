"""The last section, "Files": what the workbook holds, and links to it and to every figure
file the report wrote."""

from __future__ import annotations

from collections.abc import Sequence

from localsgd.report.render import Block, Heading, Links, Paragraph
from localsgd.report.section import Context, Drawn, Later, Parts


def parts(ctx: Context) -> Parts:
    return Parts(
        [
            Heading(2, "Files"),
            Paragraph(
                "Every run's config (the fields that apply to it), final metrics and evaluation rows are "
                "in the workbook: sheets summary, status, baseline, runs, metrics"
                + (", cluster" if ctx.estimates is not None else "")
                + (", steps_to_result" if ctx.step_table is not None else "")
                + " and units (the unit and meaning of every column)."
            ),
            Links("Tables", [("results.xlsx", "results.xlsx"), ("report.md", "report.md")]),
            Later(_figure_links),
        ]
    )


def _figure_links(drawn: Drawn, formats: Sequence[str]) -> list[Block]:
    """A line of links per figure drawn (one that had nothing to draw has no files)."""
    return [
        Links(drawing.label, [(f.upper(), f"{stem}.{f}") for f in formats])
        for stem, (drawing, plot) in drawn.items()
        if plot.figure is not None
    ]
