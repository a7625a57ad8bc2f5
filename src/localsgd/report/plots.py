"""The report's figures: matplotlib figures, saved as PNG, PDF and SVG.

What every figure holds to:

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
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from localsgd.records import Metric
from localsgd.report.labels import families, family_title
from localsgd.report.rounding import fmt, fmt_bytes, fmt_pm
from localsgd.report.tables import natural_key

FORMATS = ("png", "pdf", "svg")
DPI = 200
MARKERS = ("o", "s", "D", "P", "X", "h", "*", "p", "<", ">")
"""Markers of a family's members; the up and down triangles are kept for outliers drawn at
the edge of an axis."""
LINESTYLES = ("-", "--", ":", "-.")
CONTEXT = "0.80"
"""Other families' points and lines in a small multiple."""
OUTLIER_GAP = 2.0
"""A value is an outlier when the gap to the rest exceeds this many times the rest's range."""
SINGLE_CURVES_MAX = 5
"""More groups than this (of several families) draw curves as small multiples."""
SIDE_LEGEND_MAX = 12
"""Up to this many legend entries sit at the right; more go below, in columns."""


def _palette(n: int) -> list[Any]:
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
    return dict(zip(order, _palette(len(order))))


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


def render(fig: Figure, fmt_name: str, dpi: int = DPI) -> bytes:
    """The figure as PNG, PDF or SVG bytes. PDF fonts are embedded as TrueType (Type 42),
    which publishers accept; Type 3 fonts they often refuse."""
    buf = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42, "svg.hashsalt": "localsgd"}):
        # "tight" also rescues a title wider than its panel instead of clipping it.
        fig.savefig(buf, format=fmt_name, dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _workloads(frame: pd.DataFrame) -> list[str]:
    return sorted({str(w) for w in frame["workload"]}, key=natural_key) if len(frame) else []


# -- axes ------------------------------------------------------------------------------


def _plain(value: float, pos: int | None = None) -> str:
    return fmt(value)


def _log_ticks(axis: Any, base: int, kind: str, span: float) -> None:
    """Few readable labels on a log axis: powers of 2 as integers; decades (and 2×, 5×
    when the axis spans less than three decades) in plain numbers or bytes."""
    if base == 2:
        axis.set_major_locator(LogLocator(base=2, numticks=20))
    else:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0,) if span >= 3 else (1.0, 2.0, 5.0)))
    axis.set_minor_formatter(NullFormatter())
    label = (lambda v, pos=None: fmt_bytes(v)) if kind == "bytes" else _plain
    axis.set_major_formatter(FuncFormatter(label))


def _legend(owner: Figure | SubFigure, handles: list[Any], labels: list[str], title: str) -> None:
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
        owner.legend(handles, labels, loc="outside lower center", ncols=3, **common)


def _figure(
    blocks: list[tuple[float, float]], workloads: list[str], named: bool
) -> tuple[Figure, list[Figure | SubFigure]]:
    """A figure of one block per workload, stacked, each ``(width, height)`` inches; each
    block titled with its workload when ``named`` (the study has several) or stacked."""
    width = max(w for w, _ in blocks)
    heights = [h + (0.3 if named else 0) for _, h in blocks]
    fig = Figure(figsize=(width, sum(heights)), layout="constrained")
    FigureCanvasAgg(fig)
    if len(blocks) == 1 and not named:
        return fig, [fig]
    subs = list(fig.subfigures(len(blocks), 1, height_ratios=heights, squeeze=False)[:, 0])
    for sub, workload in zip(subs, workloads):
        sub.suptitle(f"Workload {workload}", fontsize="medium")
    return fig, subs


def _grid(owner: Figure | SubFigure, panels: int) -> list[Axes]:
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


def _grid_size(panels: int, legend_entries: int) -> tuple[float, float]:
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    below = legend_entries > SIDE_LEGEND_MAX
    width = 3.7 * ncols + (0 if below else 3.6)
    height = 3.0 * nrows + 0.7 + (0.22 * math.ceil(legend_entries / 3) if below else 0)
    return max(width, 8.0), height


def _single_size(legend_entries: int) -> tuple[float, float]:
    below = legend_entries > SIDE_LEGEND_MAX
    return (9.5 if below else 11.0), 4.8 + (0.22 * math.ceil(legend_entries / 3) if below else 0)


# -- robust limits ---------------------------------------------------------------------


def outliers(values: Sequence[float], gap: float = OUTLIER_GAP) -> tuple[set[int], set[int]]:
    """Indices of the values far below and far above the rest: the lowest (highest) k,
    k at most a quarter of the values, when the gap between them and the others exceeds
    ``gap`` × the range of the others. Four values at least; none when the rest is flat."""
    n = len(values)
    if n < 4:
        return set(), set()
    order = sorted(range(n), key=lambda i: values[i])
    v = [values[i] for i in order]
    most = max(1, n // 4)

    def cut(low: bool, keep_from: int, keep_to: int) -> int:
        best, ratio = 0, gap
        for k in range(1, most + 1):
            if low:
                between, core = v[keep_from + k] - v[keep_from + k - 1], v[keep_to] - v[keep_from + k]
            else:
                between, core = v[keep_to - k + 1] - v[keep_to - k], v[keep_to - k] - v[keep_from]
            if core > 0 and between / core > ratio:
                best, ratio = k, between / core
        return best

    low = cut(True, 0, n - 1)
    high = cut(False, low, n - 1) if n - low >= 4 else 0
    return {order[i] for i in range(low)}, {order[n - 1 - i] for i in range(high)}


@dataclass
class _Point:
    group: str
    label: str
    style: Style
    x: float
    xerr: float
    y: float
    yerr: float
    dodge: float = 0.0
    """Sideways shift in axis units (of log₁₀ or log₂ x on a log axis)."""
    edge: int = 0
    """-1: drawn at the bottom edge (an outlier below), 1: at the top, 0: in place."""


@dataclass(frozen=True)
class XAxis:
    """What a scatter shows along x, from the summary table."""

    column: str
    std: str | None
    label: str
    log: int | None = None
    bytes: bool = False
    reference: float | None = None
    """A vertical reference line (speedup 1: the baseline)."""
    higher_is_better: bool = True
    """For the Pareto front: speedup up, time down."""


def _forward(axis: XAxis, x: float) -> float:
    return math.log(x, axis.log) if axis.log else x


def _inverse(axis: XAxis, t: float) -> float:
    return float(axis.log**t) if axis.log else t


def _std(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _points(part: pd.DataFrame, axis: XAxis, metric: Metric, look: dict[str, Style]) -> list[_Point]:
    mean, std = f"final_{metric.name}_mean", f"final_{metric.name}_std"
    out = []
    for row in part.to_dict("records"):
        x, y = float(row.get(axis.column, math.nan)), float(row.get(mean, math.nan))
        if not (math.isfinite(x) and math.isfinite(y)) or (axis.log and x <= 0):
            continue
        group = str(row["group"])
        out.append(
            _Point(
                group,
                f"{group} (n={row['n_seeds']})",
                look[group],
                x,
                _std(row.get(axis.std)) if axis.std else 0.0,
                metric.scale * y,
                metric.scale * _std(row.get(std)),
            )
        )
    return out


@dataclass
class _Frame:
    """Limits of one workload's scatter, in axis units (log units on a log x)."""

    x: tuple[float, float]
    y: tuple[float, float]


def _limits(points: list[_Point], axis: XAxis) -> _Frame:
    """x spans every point with its error bar; y spans the points that are not outliers,
    with theirs. Outliers are marked on the points (``edge``)."""
    low, high = outliers([p.y for p in points])
    for i in low:
        points[i].edge = -1
    for i in high:
        points[i].edge = 1
    inside = [p for p in points if not p.edge]
    ys = [v for p in inside for v in (p.y - p.yerr, p.y + p.yerr)]
    xs = []
    for p in points:
        lo = p.x - p.xerr if not axis.log or p.x - p.xerr > 0 else p.x / 2
        xs += [_forward(axis, lo), _forward(axis, p.x + p.xerr)]
    if axis.reference is not None:
        xs.append(_forward(axis, axis.reference))
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    xpad = 0.08 * (x1 - x0) if x1 > x0 else (0.5 if axis.log else 0.1 * abs(x0) or 0.5)
    ypad = 0.12 * (y1 - y0) if y1 > y0 else 0.05 * abs(y0) or 0.5
    if low:
        y0 -= ypad  # room for the markers drawn at the edge
    if high:
        y1 += ypad
    return _Frame((x0 - xpad, x1 + xpad), (y0 - ypad, y1 + ypad))


DODGE = 0.032
"""Sideways step between points at the same x, as a fraction of the x axis (more than
``OVERLAP[0]``, so dodged points never count as overlapping)."""


def _dodge(points: list[_Point], frame: _Frame, axis: XAxis) -> None:
    """Spread points with the same x sideways, symmetrically, in family order."""
    span = frame.x[1] - frame.x[0]
    rank = {f: i for i, f in enumerate(families())}
    ties: dict[float, list[_Point]] = {}
    for p in points:
        ties.setdefault(round(_forward(axis, p.x), 9), []).append(p)
    for same in ties.values():
        if len(same) < 2:
            continue
        same.sort(key=lambda p: (rank.get(p.style.family, len(rank)), natural_key(p.group)))
        for i, p in enumerate(same):
            p.dodge = (i - (len(same) - 1) / 2) * DODGE * span
    # Room for the dodged points and the values written beside an outlier.
    reach = max((abs(p.dodge) for p in points), default=0.0) + 0.04 * span
    frame.x = (frame.x[0] - reach, frame.x[1] + reach)


OVERLAP = (0.024, 0.04)
"""Two markers overlap when closer than this along x and y (fractions of the axes)."""


def _overlap(points: list[_Point], frame: _Frame, axis: XAxis) -> bool:
    """Whether any two markers drawn in place would cover each other."""
    (x0, x1), (y0, y1) = frame.x, frame.y
    spots = [
        ((_forward(axis, p.x) + p.dodge - x0) / (x1 - x0), (p.y - y0) / (y1 - y0))
        for p in points
        if not p.edge
    ]
    return any(
        abs(a[0] - b[0]) < OVERLAP[0] and abs(a[1] - b[1]) < OVERLAP[1]
        for i, a in enumerate(spots)
        for b in spots[i + 1 :]
    )


def _draw_point(ax: Axes, p: _Point, axis: XAxis, frame: _Frame, metric: Metric, *, context: bool) -> Any:
    """One point with its error bars (shifted together by its dodge); an outlier as an
    arrowhead at the edge, with its value. Returns the legend handle."""

    def shift(v: float) -> float:
        return _inverse(axis, _forward(axis, v) + p.dodge) if p.dodge else v

    x = shift(p.x)
    lo = p.x - p.xerr if not axis.log or p.x - p.xerr > 0 else p.x / 2
    xerr = [[x - shift(lo)], [shift(p.x + p.xerr) - x]] if p.xerr else None
    color = CONTEXT if context else p.style.color
    if p.edge:
        (y0, y1) = frame.y
        y = y0 + 0.03 * (y1 - y0) if p.edge < 0 else y1 - 0.03 * (y1 - y0)
        handle = ax.plot(
            [x],
            [y],
            marker="v" if p.edge < 0 else "^",
            color=color,
            markersize=9,
            linestyle="none",
            zorder=2 if context else 4,
        )[0]
        if not context:
            value = f"{fmt_pm(p.y, p.yerr)} {metric.unit}".strip()
            note = ax.annotate(
                f"{value} {'↓' if p.edge < 0 else '↑'}",
                (x, y),
                xytext=(0, 7 if p.edge < 0 else -14),
                textcoords="offset points",
                ha="center",
                fontsize="x-small",
                color=p.style.color,
            )
            note.set_in_layout(False)
        return handle
    if context:
        return ax.plot(
            [x], [p.y], marker=p.style.marker, color=CONTEXT, markersize=5, linestyle="none", zorder=1
        )[0]
    return ax.errorbar(
        x,
        p.y,
        yerr=p.yerr or None,
        xerr=xerr,
        fmt=p.style.marker,
        color=p.style.color,
        markersize=7,
        markeredgecolor="white",
        markeredgewidth=0.7,
        capsize=3,
        elinewidth=1.1,
        zorder=3,
    )


def _decorate(ax: Axes, axis: XAxis, frame: _Frame) -> None:
    ax.grid(True, alpha=0.3)
    if axis.log:
        ax.set_xscale("log", base=axis.log)
        span = (frame.x[1] - frame.x[0]) * (math.log10(axis.log))
        _log_ticks(ax.xaxis, axis.log, "bytes" if axis.bytes else "plain", span)
    ax.set_xlim(_inverse(axis, frame.x[0]), _inverse(axis, frame.x[1]))
    ax.set_ylim(*frame.y)
    if axis.reference is not None:
        ax.axvline(axis.reference, color="0.5", linestyle="--", linewidth=1, zorder=0)


Metrics = dict[str, Metric]
"""Per workload, the metric a figure shows (its primary metric)."""


def _panels(
    summary: pd.DataFrame,
    look: dict[str, Style],
    metrics: Metrics,
    axis: XAxis,
    why_empty: str,
    left_out: dict[str, str],
) -> list[tuple[str, Metric, list[_Point], _Frame]]:
    """Per workload with something to draw: its metric, points (dodged) and limits; the
    others go to ``left_out`` with the reason."""
    out = []
    for workload in _workloads(summary):
        metric = metrics.get(workload)
        if metric is None:
            left_out[workload] = "no completed run declared a metric"
            continue
        points = _points(summary[summary["workload"] == workload], axis, metric, look)
        if not points:
            left_out[workload] = why_empty
            continue
        frame = _limits(points, axis)
        _dodge(points, frame, axis)
        out.append((workload, metric, points, frame))
    return out


def scatter(
    summary: pd.DataFrame,
    look: dict[str, Style],
    metrics: Metrics,
    axis: XAxis,
    *,
    title: str,
    why_empty: str,
    front: bool = False,
) -> Plot:
    """Each workload's final primary metric (mean ± std over seeds) against ``axis``: one
    panel, or one panel per family when markers would overlap. With ``front``, the Pareto
    front of the means is drawn in every panel as a staircase and the points it leaves
    behind are faded (and called dominated in the legend)."""
    blocks: list[tuple[str, Metric, list[_Point], _Frame, bool, list[bool]]] = []
    left_out: dict[str, str] = {}
    for workload, metric, points, frame in _panels(summary, look, metrics, axis, why_empty, left_out):
        multiples = len({p.style.family for p in points}) > 1 and _overlap(points, frame, axis)
        best = (
            pareto_front(
                [p.x for p in points], [p.y for p in points], axis.higher_is_better, metric.higher_is_better
            )
            if front
            else [True] * len(points)
        )
        blocks.append((workload, metric, points, frame, multiples, best))
    if not blocks:
        return Plot(None, left_out)
    sizes = []
    for _, _, points, _, multiples, _ in blocks:
        n_families = len({p.style.family for p in points})
        sizes.append(_grid_size(n_families, len(points)) if multiples else _single_size(len(points)))
    fig, owners = _figure(sizes, [b[0] for b in blocks], len(_workloads(summary)) > 1)
    order = look_families(look)
    for owner, (_, metric, points, frame, multiples, best) in zip(owners, blocks):
        dominated = {p.group for p, b in zip(points, best) if not b}
        handles, labels = [], []
        present = sorted(dict.fromkeys(p.style.family for p in points), key=order.index)
        axes = _grid(owner, len(present)) if multiples else [owner.subplots()]
        for ax, family in zip(axes, present if multiples else [None]):
            if family is not None:
                ax.set_title(family_title(family), fontsize="medium")
            for p in sorted(points, key=lambda p: list(look).index(p.group)):
                if family is not None and p.style.family != family:
                    _draw_point(ax, p, axis, frame, metric, context=True)
                    continue
                handle = _draw_point(ax, p, axis, frame, metric, context=False)
                if p.group in dominated:
                    _fade(handle)
                handles.append(handle)
                labels.append(p.label + (", dominated" if p.group in dominated else ""))
            if front:
                _staircase(ax, [p for p, b in zip(points, best) if b and not p.edge], axis, metric)
            _decorate(ax, axis, frame)
        if multiples:
            owner.supxlabel(axis.label, fontsize="medium")
            owner.supylabel(f"final {metric.heading}", fontsize="medium")
        else:
            axes[0].set_xlabel(axis.label)
            axes[0].set_ylabel(f"final {metric.heading}")
        line = axes[0].get_legend_handles_labels()
        _legend(owner, [*line[0], *handles], [*line[1], *labels], "variant, workers K (seeds)")
    fig.suptitle(_sentence(title.format(metric=_title_metric(metrics))))
    return Plot(fig, left_out)


def _fade(handle: Any) -> None:
    for artist in handle.get_children() if isinstance(handle, ErrorbarContainer) else [handle]:
        artist.set_alpha(0.35)


def _staircase(ax: Axes, best: list[_Point], axis: XAxis, metric: Metric) -> None:
    """The edge of the region the front dominates: sorted by x, each step holds the next
    point's value when both axes point the same way, the previous one's else."""
    best = sorted(best, key=lambda p: p.x)
    if len(best) < 2:
        return
    ax.step(
        [p.x for p in best],
        [p.y for p in best],
        where="pre" if axis.higher_is_better == metric.higher_is_better else "post",
        color="0.15",
        linewidth=1.3,
        linestyle="--",
        zorder=2.5,  # above the error bars' context, below the markers
        label="Pareto front",
    )


def look_families(look: dict[str, Style]) -> list[str]:
    """The families of ``look`` in colour order."""
    return list(dict.fromkeys(s.family for s in look.values()))


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _title_metric(metrics: Metrics) -> str:
    names = list(dict.fromkeys(m.title for m in metrics.values()))
    return names[0] if len(names) == 1 else "primary metric"


# -- the figures -------------------------------------------------------------------------

SPEEDUP = XAxis(
    "speedup",
    "speedup_std",
    "speedup over one worker (×; K=1 mean wall time / mean wall time)",
    reference=1.0,
)


def metric_vs_speedup(summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> Plot:
    """The headline: what each variant buys in time and costs in its primary metric."""
    return scatter(
        summary,
        look,
        metrics,
        SPEEDUP,
        title="Final {metric} against speedup over one worker (mean ± std over seeds)",
        why_empty="no completed K=1 run to measure speedup against",
    )


def metric_vs_est_speedup(
    summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics, cluster: str
) -> Plot:
    axis = XAxis(
        "est_speedup",
        "est_speedup_std",
        f"estimated speedup over one worker on {cluster} (×)",
        reference=1.0,
    )
    return scatter(
        summary,
        look,
        metrics,
        axis,
        title=f"Final {{metric}} against estimated speedup on {cluster} (mean ± std over seeds)",
        why_empty="no completed K=1 run, or no compute time, to estimate speedup against",
    )


def metric_vs_bytes(summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> Plot:
    """The primary metric against communication volume; K=1 runs (0 bytes) have no place
    on a log axis and are left out."""
    axis = XAxis(
        "bytes_mean",
        "bytes_std",
        "communication payload per worker over the run (log scale; kB = 1000 B)",
        log=10,
        bytes=True,
    )
    return scatter(
        summary[summary["bytes_mean"].astype(float) > 0],
        look,
        metrics,
        axis,
        title="Final {metric} against communication volume (mean ± std over seeds)",
        why_empty="no run communicated (only K=1 runs)",
    )


def metric_vs_period_workers(summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> Plot:
    """The primary metric against H·K: local steps between averagings times workers."""
    part = summary[summary["period"].notna() & (summary["workers"].astype(int) > 1)].copy()
    part["period_workers"] = part["period"].astype(float) * part["workers"].astype(float)
    axis = XAxis("period_workers", None, "H·K (local steps between averagings × workers, log₂ scale)", log=2)
    return scatter(
        part,
        look,
        metrics,
        axis,
        title="Final {metric} against H·K (mean ± std over seeds)",
        why_empty="no run of K>1 workers with an algorithm that has a period H",
    )


# -- Pareto fronts -----------------------------------------------------------------------


def pareto_front(xs: Sequence[float], ys: Sequence[float], x_higher: bool, y_higher: bool) -> list[bool]:
    """Whether each point is on the Pareto front: no other point is at least as good on
    both axes and better on one."""
    sx = 1.0 if x_higher else -1.0
    sy = 1.0 if y_higher else -1.0
    out = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        dominated = any(
            sx * xj >= sx * x and sy * yj >= sy * y and (sx * xj > sx * x or sy * yj > sy * y)
            for j, (xj, yj) in enumerate(zip(xs, ys))
            if j != i
        )
        out.append(not dominated)
    return out


def pareto(
    summary: pd.DataFrame,
    look: dict[str, Style],
    metrics: Metrics,
    axis: XAxis,
    *,
    title: str,
    why_empty: str,
) -> Plot:
    """The final primary metric against ``axis`` with the Pareto front of the means."""
    return scatter(summary, look, metrics, axis, title=title, why_empty=why_empty, front=True)


def pareto_speedup(summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> Plot:
    return pareto(
        summary,
        look,
        metrics,
        SPEEDUP,
        title="Pareto front: final {metric} against speedup over one worker",
        why_empty="no completed K=1 run to measure speedup against",
    )


def pareto_est_time(summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics, cluster: str) -> Plot:
    axis = XAxis(
        "est_total_seconds_mean",
        "est_total_seconds_std",
        f"estimated training time on {cluster} (s, log scale; compute + communication)",
        log=10,
        higher_is_better=False,
    )
    return pareto(
        summary,
        look,
        metrics,
        axis,
        title=f"Pareto front: final {{metric}} against estimated time on {cluster}",
        why_empty="no run with an estimated time",
    )


# -- curves ------------------------------------------------------------------------------

YSpec = Callable[[str], tuple[str, float, str] | None]
"""Per workload: (column, scale, y label) of a curve, or None when there is nothing."""


def _metric_y(metrics: Metrics) -> YSpec:
    def spec(workload: str) -> tuple[str, float, str] | None:
        m = metrics.get(workload)
        return (m.name, m.scale, m.heading) if m else None

    return spec


def _train_loss_y(workload: str) -> tuple[str, float, str]:
    return ("train_loss", 1.0, "train loss")


def _line(
    ax: Axes, line: pd.DataFrame, x: str, y: str, scale: float, style: Style, *, context: bool, log_y: bool
) -> Any:
    xs = line[x].astype(float).to_numpy()
    mean = line[y].astype(float).to_numpy() * scale
    if context:
        return ax.plot(xs, mean, color=CONTEXT, linewidth=0.9, zorder=1)[0]
    std = np.nan_to_num(line[f"{y}_std"].astype(float).to_numpy() * scale)
    low, high = mean - std, mean + std
    if log_y:
        low = np.where(low > 0, low, mean)  # a band below zero has no place on a log axis
    ax.fill_between(xs, low, high, color=style.color, alpha=0.18, linewidth=0, zorder=2)
    return ax.plot(
        xs,
        mean,
        color=style.color,
        linestyle=style.linestyle,
        marker=style.marker,
        markevery=max(1, len(xs) // 8),
        markersize=4,
        linewidth=1.5,
        zorder=3,
    )[0]


def _curves(
    curves: pd.DataFrame,
    look: dict[str, Style],
    x: str,
    y_of: YSpec,
    *,
    title: str,
    xlabel: str,
    log_y: bool = False,
) -> Plot:
    """A line per group (mean over its completed seeds at each evaluation step) in a band
    of ± one std; one panel, or one per family (the others in grey) for many groups."""
    left_out: dict[str, str] = {}
    blocks = []
    for workload in _workloads(curves):
        part = curves[curves["workload"] == workload]
        spec = y_of(workload)
        if spec is None or spec[0] not in part.columns or x not in part.columns:
            left_out[workload] = "no completed run declared a metric"
            continue
        groups = [g for g in look if g in set(part["group"])]
        lines = {g: part[part["group"] == g].sort_values("step") for g in groups}
        lines = {g: ln for g, ln in lines.items() if np.isfinite(ln[spec[0]].astype(float)).any()}
        if not lines:
            left_out[workload] = "no evaluation rows"
            continue
        present = list(dict.fromkeys(look[g].family for g in lines))
        multiples = len(lines) > SINGLE_CURVES_MAX and len(present) > 1
        blocks.append((workload, spec, lines, present, multiples))
    if not blocks:
        return Plot(None, left_out)
    sizes = [
        _grid_size(len(present), len(lines)) if multiples else _single_size(len(lines))
        for _, _, lines, present, multiples in blocks
    ]
    fig, owners = _figure(sizes, [b[0] for b in blocks], len(_workloads(curves)) > 1)
    for owner, (_, (y, scale, ylabel), lines, present, multiples) in zip(owners, blocks):
        positive = log_y and all((ln[y].astype(float).dropna() > 0).all() for ln in lines.values())
        handles, labels = [], []
        axes = _grid(owner, len(present)) if multiples else [owner.subplots()]
        for ax, family in zip(axes, present if multiples else [None]):
            if family is not None:
                ax.set_title(family_title(family), fontsize="medium")
                for g, ln in lines.items():
                    if look[g].family != family:
                        _line(ax, ln, x, y, scale, look[g], context=True, log_y=positive)
            for g, ln in lines.items():
                if family is None or look[g].family == family:
                    handles.append(_line(ax, ln, x, y, scale, look[g], context=False, log_y=positive))
                    labels.append(g)
            ax.grid(True, alpha=0.3)
            if positive:
                ax.set_yscale("log")
                low, high = ax.get_ylim()
                _log_ticks(ax.yaxis, 10, "plain", math.log10(high / low))
        label = f"{ylabel}, log scale" if positive else ylabel
        if multiples:
            owner.supxlabel(xlabel, fontsize="medium")
            owner.supylabel(label, fontsize="medium")
        else:
            axes[0].set_xlabel(xlabel)
            axes[0].set_ylabel(label)
        _legend(owner, handles, labels, "variant, workers K")
    names = list(dict.fromkeys(spec[2].split(" (")[0] for _, spec, _, _, _ in blocks))
    fig.suptitle(_sentence(title.format(metric=names[0] if len(names) == 1 else "primary metric")))
    return Plot(fig, left_out)


EPOCHS = "epoch (passes over the training set)"
WALL = "training wall time (s, evaluation excluded)"
BAND = "mean ± std over seeds"


def metric_vs_epochs(curves: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> Plot:
    return _curves(
        curves, look, "epoch", _metric_y(metrics), title=f"{{metric}} during training ({BAND})", xlabel=EPOCHS
    )


def metric_vs_wall_time(curves: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> Plot:
    return _curves(
        curves,
        look,
        "wall_seconds",
        _metric_y(metrics),
        title=f"{{metric}} against training time ({BAND})",
        xlabel=WALL,
    )


def metric_vs_est_time(curves: pd.DataFrame, look: dict[str, Style], metrics: Metrics, cluster: str) -> Plot:
    return _curves(
        curves,
        look,
        "est_total_seconds",
        _metric_y(metrics),
        title=f"{{metric}} against estimated training time on {cluster} ({BAND})",
        xlabel=f"estimated time on {cluster} (s, compute + communication, evaluation excluded)",
    )


def train_loss_vs_epochs(curves: pd.DataFrame, look: dict[str, Style]) -> Plot:
    return _curves(
        curves,
        look,
        "epoch",
        _train_loss_y,
        log_y=True,
        title=f"Train loss during training (mean over workers; {BAND})",
        xlabel=EPOCHS,
    )


def train_loss_vs_wall_time(curves: pd.DataFrame, look: dict[str, Style]) -> Plot:
    return _curves(
        curves,
        look,
        "wall_seconds",
        _train_loss_y,
        log_y=True,
        title=f"Train loss against training time (mean over workers; {BAND})",
        xlabel=WALL,
    )
