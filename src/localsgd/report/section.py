"""What a report section is: one module with a ``parts(ctx)`` function that returns its
document blocks, the figures they show and its workbook sheets, for a :class:`Context`
the builder computes once. The sections, in order, are listed in
:data:`localsgd.report.sections.SECTIONS`; the builder (:mod:`~localsgd.report.build`)
draws, writes and renders what they return, and finds nothing by its text.

A figure is a :class:`Drawing`: its file stem, caption and draw callable, written once in
the section that shows it. The section places it with :class:`Shown`, which refers to the
same object; after every figure is drawn, ``Shown`` becomes the figure (with a note on
workloads left out of it) or a sentence saying why there is none. :class:`Later` blocks
are made once every figure is drawn (the list of figure files).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from localsgd.report import graphics
from localsgd.report.estimates import ClusterEstimates
from localsgd.report.render import Block, Figure, Heading, Paragraph
from localsgd.report.selection import Selection
from localsgd.report.steps import Goal
from localsgd.report.tables import Study
from localsgd.report.workbook import Sheet


@dataclass(frozen=True)
class Context:
    """What every section may read, computed once by the builder from the store and the
    report's options."""

    study: Study
    """The loaded store; with a cluster, its runs carry the estimates' columns."""
    summary: pd.DataFrame
    """One row per configuration: mean ± std over seeds (and the estimates, with a cluster)."""
    status: pd.DataFrame
    baseline: pd.DataFrame
    curves: pd.DataFrame
    """Per configuration and evaluation: mean ± std over seeds of every curve."""
    look: dict[str, graphics.Style]
    """Per configuration its colour and marker, the same in every figure."""
    metrics: graphics.Metrics
    """Per workload its primary metric."""
    select: Selection
    """The split targets and steps-to-result read, per workload."""
    estimates: ClusterEstimates | None
    """Wall-clock estimates on ``--cluster``; None without one."""
    goals: dict[str, Goal]
    """Per workload its steps-to-result target (``--target`` or the study's)."""
    step_table: pd.DataFrame | None
    """Steps to result per cell; None without a target."""
    formats: tuple[str, ...]
    dpi: int
    out: Path


@dataclass(frozen=True, eq=False)
class Drawing:
    """A figure of the report: its file stem (``stem.png``, ...), caption and how to draw it.
    Compared by identity: the :class:`Shown` block holds the very object the section made."""

    stem: str
    caption: str
    draw: Callable[[], graphics.Plot]
    listed_as: str = ""
    """Its label in the list of figure files (default: the caption up to its first " (")."""

    @property
    def title(self) -> str:
        return self.caption.split(" (")[0]

    @property
    def label(self) -> str:
        return self.listed_as or self.title

    @classmethod
    def made(cls, stem: str, caption: str, figure: Any) -> Drawing:
        """A figure a section drew already (to learn whether it has one at all); listed
        under its whole caption."""
        plot = graphics.Plot(figure)
        return cls(stem, caption, lambda: plot, listed_as=caption)


Drawn = Mapping[str, tuple[Drawing, graphics.Plot]]
"""Every figure of the report by stem, in the order the sections show them."""


@dataclass(frozen=True)
class Shown:
    """A drawing placed in the document."""

    drawing: Drawing

    def blocks(self, drawn: Drawn, formats: Sequence[str]) -> list[Block]:
        """The figure with its caption and files, or a sentence saying why there is none;
        a note for workloads left out of a drawn figure."""
        drawing = self.drawing
        plot = drawn[drawing.stem][1]
        if plot.figure is None:
            reasons = sorted(set(plot.left_out.values()))
            return [Paragraph(f"No figure “{drawing.title}”: {'; '.join(reasons)}.")]
        blocks: list[Block] = [Figure(drawing.stem, drawing.caption, formats)]
        if plot.left_out:
            blocks.append(
                Paragraph(
                    "Not in this figure: "
                    + "; ".join(f"{w} ({why})" for w, why in sorted(plot.left_out.items()))
                    + "."
                )
            )
        return blocks


@dataclass(frozen=True)
class Later:
    """Blocks made once every figure of the report is drawn."""

    make: Callable[[Drawn, Sequence[str]], list[Block]]

    def blocks(self, drawn: Drawn, formats: Sequence[str]) -> list[Block]:
        return self.make(drawn, formats)


Part = Block | Shown | Later


@dataclass(frozen=True)
class Parts:
    """What one section adds to the report; nothing by default (a section that does not
    apply to the study)."""

    blocks: Sequence[Part] = ()
    sheets: Mapping[str, Sheet] = field(default_factory=dict)
    """Workbook sheets by name, in order."""

    @property
    def figures(self) -> list[Drawing]:
        """The drawings its blocks show, in order: a section draws only what it shows."""
        return [b.drawing for b in self.blocks if isinstance(b, Shown)]


class Section(Protocol):
    """A section: a module (or any object) with ``parts``."""

    def parts(self, ctx: Context) -> Parts: ...


def resolve(parts: Sequence[Part], drawn: Drawn, formats: Sequence[str]) -> list[Block]:
    """The document blocks, with every drawing and later block made."""
    out: list[Block] = []
    for part in parts:
        out += part.blocks(drawn, formats) if isinstance(part, Shown | Later) else [part]
    return out


def one_figure(heading: str, text: str, stem: str, caption: str, figure: Any) -> Parts:
    """A section of one figure, drawn already: its heading, a paragraph and the figure;
    nothing when ``figure`` is None."""
    if figure is None:
        return Parts()
    return Parts([Heading(2, heading), Paragraph(text), Shown(Drawing.made(stem, caption, figure))])
