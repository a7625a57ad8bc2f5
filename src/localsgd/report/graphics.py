"""What every figure of the report shares: colours, markers, layout, ticks and file output.

The conventions each figure holds to:

- one colour per algorithm family (the registry's order), the same in every figure; the
  members of a family (periods, worker counts) differ in shade, marker and line style;
- mean ± std over seeds: bands on curves, error bars on points, on every axis that varies
  (speedup inherits the spread of the wall times);
- no marker hides another: points that share an x are dodged sideways, and when markers
  would still overlap, the figure becomes small multiples, one panel per family with every
  other point in grey for context; curves of many groups are drawn the same way;
- the metric axis is not stretched by an outlier: a point far from the rest (a poor or
  diverging configuration) is drawn at the edge of the axis, pointing out, with its value;
- log axes carry few, plain tick labels (``1 MB``, ``16``, ``0.5``);
- no empty panel: a figure (or a workload's panel) without data is left out and the
  report says why (:attr:`Plot.left_out`).

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through
``pyplot``, so reporting changes no global matplotlib state and needs no display.
:mod:`~localsgd.report.plots` draws the final values as points, :mod:`~localsgd.report.curve_plots`
the training curves.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from localsgd.records import Metric
from localsgd.report.labels import families
from localsgd.report.rounding import fmt, fmt_bytes
from localsgd.report.tables import natural_key

FORMATS = ("png", "pdf", "svg")
DPI = 200
MARKERS = ("o", "s", "D", "P", "X", "h", "*", "p", "<", ">")
"""Markers of a family's members; the up and down triangles are kept for outliers drawn at
the edge of an axis."""
LINESTYLES = ("-", "--", ":", "-.")
BASELINE_LINE: dict[str, Any] = {"linestyle": (0, (7, 2.5)), "linewidth": 1.0, "gid": "baseline"}
"""A synchronous baseline's value drawn across a figure: long dashes, apart from the dashes
of ``LINESTYLES``."""
CONTEXT = "0.80"
"""Other families' points and lines in a small multiple."""
CONTEXT_DARK = "0.35"
"""A legend's key for a line style or marker alone (its colour given elsewhere)."""
SIDE_LEGEND_MAX = 12
"""Up to this many legend entries sit at the right; more go below, in columns."""


def palette(n: int) -> list[Any]:
    """``n`` distinct colours, none of them grey (grey is for context)."""
    from matplotlib import colormaps

    tab10 = [colormaps["tab10"](i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
    if n <= len(tab10):
        return tab10
    tab20 = [colormaps["tab20"](i) for i in range(20) if i not in (14, 15)]
    if n <= len(tab20):
        return tab20
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


def _shade(color: Any, amount: float) -> tuple[float, float, float, float]:
    """Darker for ``amount`` < 0 (towards black), lighter for > 0 (towards white)."""
    r, g, b = (float(c) for c in matplotlib.colors.to_rgb(color))
    if amount < 0:
        k = 1 + amount
        return (r * k, g * k, b * k, 1.0)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount, 1.0)


@dataclass(frozen=True)
class Style:
    color: Any
    marker: str
    linestyle: str
    family: str


def family_colors(names: Sequence[str]) -> dict[str, Any]:
    """A colour per algorithm family: the registered ones in the registry's order, then any
    other name (an algorithm this installation does not register) sorted."""
    order = families()
    order += sorted({str(n) for n in names} - set(order))
    return dict(zip(order, palette(len(order))))


def styles(summary: pd.DataFrame) -> dict[str, Style]:
    """One look per group, shared by every figure: the family's colour, shaded from dark to
    light over its members (in natural order of their labels), a marker and line style per
    member."""
    if summary.empty:
        return {}
    colors = family_colors(list(summary["algorithm"].astype(str)))
    out: dict[str, Style] = {}
    for family in colors:
        part = summary[summary["algorithm"].astype(str) == family]
        groups = sorted(dict.fromkeys(str(g) for g in part["group"]), key=natural_key)
        n = len(groups)
        for i, group in enumerate(groups):
            # Mild shades: lighter or darker enough to tell members apart, not enough to
            # pass for a neighbouring family's colour; markers tell them apart too.
            amount = 0.0 if n == 1 else -0.3 + 0.5 * i / (n - 1)
            out[group] = Style(
                _shade(colors[family], amount),
                MARKERS[i % len(MARKERS)],
                LINESTYLES[i % len(LINESTYLES)],
                family,
            )
    return out


@dataclass
class Plot:
    """A drawn figure, or None when no workload had anything to draw."""

    figure: Figure | None
    left_out: dict[str, str] = field(default_factory=dict)
    """Per workload left out of the figure: why."""


def render(fig: Figure, formats: Sequence[str], dpi: int = DPI) -> dict[str, bytes]:
    """The figure as PNG (always: the HTML page shows it), and as each of ``formats`` (PNG,
    PDF, SVG). PDF fonts are embedded as TrueType (Type 42), which publishers accept; Type 3
    fonts they often refuse.

    The PNG is drawn first, with the layout computed and the bounding box made tight (which
    also rescues a title wider than its panel); the other formats reuse both instead of
    laying the figure out again."""
    out: dict[str, bytes] = {}
    with matplotlib.rc_context({"pdf.fonttype": 42, "svg.hashsalt": "localsgd"}):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
        out["png"] = buf.getvalue()
        canvas = fig.canvas
        assert isinstance(canvas, FigureCanvasAgg), type(canvas)  # every figure here is on Agg
        bbox = fig.get_tightbbox(canvas.get_renderer()).padded(matplotlib.rcParams["savefig.pad_inches"])
        fig.set_layout_engine("none")
        for kind in dict.fromkeys(formats):
            if kind != "png":
                buf = io.BytesIO()
                fig.savefig(buf, format=kind, dpi=dpi, bbox_inches=bbox, facecolor="white")
                out[kind] = buf.getvalue()
    return out


def workloads(frame: pd.DataFrame) -> list[str]:
    return sorted({str(w) for w in frame["workload"]}, key=natural_key) if len(frame) else []


# -- axes ------------------------------------------------------------------------------


def _plain(value: float, pos: int | None = None) -> str:
    return fmt(value)


def log_ticks(axis: Any, base: int, kind: str, span: float) -> None:
    """Few readable labels on a log axis: powers of 2 as integers; decades (and 2×, 5×
    when the axis spans less than three decades, 3× and 7× too below about one) in plain
    numbers or bytes."""
    if base == 2:
        axis.set_major_locator(LogLocator(base=2, numticks=20))
    else:
        subs = (1.0,) if span >= 3 else (1.0, 2.0, 5.0) if span >= 1.2 else (1.0, 2.0, 3.0, 5.0, 7.0)
        axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_minor_formatter(NullFormatter())
    label = (lambda v, pos=None: fmt_bytes(v)) if kind == "bytes" else _plain
    axis.set_major_formatter(FuncFormatter(label))


def legend(owner: Figure | SubFigure, handles: list[Any], labels: list[str], title: str) -> None:
    if not handles:
        return
    common: dict[str, Any] = {
        "fontsize": "small",
        "title": title,
        "title_fontsize": "small",
        "frameon": False,
    }
    if len(handles) <= SIDE_LEGEND_MAX:
        owner.legend(handles, labels, loc="outside right center", **common)
    else:
        owner.legend(handles, labels, loc="outside lower center", ncols=3, alignment="center", **common)


def labels_and_legend(
    owner: Figure | SubFigure, xlabel: str, ylabel: str, handles: list[Any], labels: list[str], title: str
) -> None:
    """A panel grid's shared axis labels and its legend. Where the legend goes below the
    panels, the x label heads it: constrained layout puts an outside legend and a
    ``supxlabel`` both at the figure's bottom edge, one over the other."""
    owner.supylabel(ylabel, fontsize="medium")
    if len(handles) > SIDE_LEGEND_MAX:
        legend(owner, handles, labels, f"{xlabel}\n\n{title}")
        return
    owner.supxlabel(xlabel, fontsize="medium")
    legend(owner, handles, labels, title)


def add_entries(handles: list[Any], labels: list[str], drawn: tuple[list[Any], list[str]]) -> None:
    """A panel's legend entries added to a figure's, each label once."""
    for handle, label in zip(*drawn):
        if label not in labels:
            handles.append(handle)
            labels.append(label)


def stack(
    blocks: list[tuple[float, float]], workloads: list[str], named: bool, title: str
) -> tuple[Figure, list[Figure | SubFigure]]:
    """A figure titled ``title`` of one block per workload, stacked, each ``(width,
    height)`` inches; each block titled with its workload when ``named`` (the study has
    several) or stacked. Stacked blocks get a title row of their own above them: a
    figure's suptitle is not part of the constrained layout of its subfigures and would
    sit on the first block's title."""
    width = max(w for w, _ in blocks)
    heights = [h + (0.3 if named else 0) for _, h in blocks]
    if len(blocks) == 1 and not named:
        fig = Figure(figsize=(width, sum(heights)), layout="constrained")
        FigureCanvasAgg(fig)
        fig.suptitle(title)
        return fig, [fig]
    heights = [TITLE_ROW, *heights]
    fig = Figure(figsize=(width, sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)
    head, *subs = list(fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0])
    head.text(0.5, 0.5, title, ha="center", va="center", fontsize="large")
    for sub, workload in zip(subs, workloads):
        sub.suptitle(f"Workload {workload}", fontsize="medium")
    return fig, subs


TITLE_ROW = 0.45
"""Inches above stacked blocks for the figure's title."""


def grid(owner: Figure | SubFigure, panels: int) -> list[Axes]:
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    axes = owner.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    # The x tick labels of a panel above an empty slot would be hidden by sharex.
    for ax in flat[:panels]:
        ax.xaxis.set_tick_params(labelbottom=True)
    return flat[:panels]


def grid_size(panels: int, legend_entries: int) -> tuple[float, float]:
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    below = legend_entries > SIDE_LEGEND_MAX
    width = 3.7 * ncols + (0 if below else 3.6)
    height = 3.0 * nrows + 0.7 + (0.22 * math.ceil(legend_entries / 3) if below else 0)
    return max(width, 8.0), height


def single_size(legend_entries: int) -> tuple[float, float]:
    below = legend_entries > SIDE_LEGEND_MAX
    return (9.5 if below else 11.0), 4.8 + (0.22 * math.ceil(legend_entries / 3) if below else 0)


Metrics = dict[str, Metric]
"""Per workload, the metric a figure shows (its primary metric)."""


def look_families(look: dict[str, Style]) -> list[str]:
    """The families of ``look`` in colour order."""
    return list(dict.fromkeys(s.family for s in look.values()))


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def title_metric(metrics: Metrics) -> str:
    names = list(dict.fromkeys(m.title for m in metrics.values()))
    return names[0] if len(names) == 1 else "primary metric"


# -- the figures -------------------------------------------------------------------------
