"""The report's point figures: each configuration's final primary metric (mean ± std over
seeds) against speedup, estimated speedup, communication volume or H·K, with error bars on
both axes where both vary, and the Pareto fronts. Conventions in :mod:`~localsgd.report.graphics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.container import ErrorbarContainer

from localsgd.records import Metric
from localsgd.report.graphics import (
    BASELINE_LINE,
    CONTEXT,
    LINESTYLES,
    Metrics,
    Plot,
    Style,
    grid,
    grid_size,
    labels_and_legend,
    legend,
    log_ticks,
    look_families,
    sentence,
    single_size,
    stack,
    title_metric,
    workloads,
)
from localsgd.report.labels import families, family_title, synchronous_baseline
from localsgd.report.rounding import fmt_pm
from localsgd.report.tables import natural_key

OUTLIER_GAP = 2.0
"""A value is an outlier when the gap to the rest exceeds this many times the rest's range."""


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
    line: str | None = None
    """The line the point belongs to (``XAxis.connect``), if any."""
    connected: Any = None
    """The point's value of ``XAxis.connect`` (its K)."""
    baseline: bool = False
    """The synchronous baseline (``XAxis.baselines``)."""


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
    connect: str | None = None
    """A summary column: points of one variant (``line_variant``: the variant without H;
    else the family) with the same value of it are joined by a line (one line per K in the
    H·K view)."""
    baselines: bool = False
    """Mark each synchronous-baseline point (mini-batch SGD) by a long-dashed line at its value,
    across the points with the same ``connect`` value (its K)."""


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


def _line_key(row: dict[str, Any], axis: XAxis, several_batches: bool) -> str | None:
    """``"local_sgd, K=4"``: the variant without H and the ``connect`` value, plus the
    per-worker batch and the setting where they tell lines apart."""
    if not axis.connect:
        return None
    variant = row.get("line_variant")
    key = f"{variant if isinstance(variant, str) and variant else row['algorithm']}, K={row[axis.connect]}"
    if several_batches:
        key += f", B={row['batch_size']}"
    setting = row.get("setting")
    if isinstance(setting, str) and setting:
        key += f" [{setting}]"
    return key


def _points(part: pd.DataFrame, axis: XAxis, metric: Metric, look: dict[str, Style]) -> list[_Point]:
    mean, std = f"final_{metric.name}_mean", f"final_{metric.name}_std"
    several_batches = "batch_size" in part.columns and part["batch_size"].nunique() > 1
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
                line=_line_key(row, axis, several_batches),
                connected=row[axis.connect] if axis.connect else None,
                baseline=axis.baselines and synchronous_baseline(str(row["algorithm"])),
            )
        )
    return out


def _lines(ax: Axes, points: list[_Point], axis: XAxis, family: str | None) -> tuple[list[Any], list[str]]:
    """Join the in-place points of each line (sorted by x), one line style per line of a
    family, in the family's colour; returns the legend handles and labels."""
    handles, labels = [], []
    keyed: dict[str, list[_Point]] = {}
    for p in points:
        mine = family is None or p.style.family == family
        if p.line is not None and not p.edge and not p.baseline and mine:
            keyed.setdefault(p.line, []).append(p)
    for i, (key, members) in enumerate(sorted(keyed.items(), key=lambda kv: natural_key(kv[0]))):
        if len(members) < 2:
            continue
        members.sort(key=lambda p: p.x)
        xs = [_inverse(axis, _forward(axis, p.x) + p.dodge) for p in members]
        color = members[len(members) // 2].style.color
        style = LINESTYLES[i % len(LINESTYLES)]
        handles.append(
            ax.plot(xs, [p.y for p in members], color=color, linestyle=style, linewidth=1.1, zorder=2)[0]
        )
        labels.append(f"line: {key}")
    return handles, labels


def _baselines(ax: Axes, points: list[_Point], axis: XAxis) -> tuple[list[Any], list[str]]:
    """A long-dashed line at each synchronous baseline's value, in its colour, from its point
    across the other points of its K; returns the legend handles and labels."""
    handles, labels = [], []
    for base in points:
        if not base.baseline or base.edge:
            continue
        xs = [
            _inverse(axis, _forward(axis, p.x) + p.dodge)
            for p in points
            if p.connected == base.connected and not p.edge
        ]
        if len(xs) < 2:
            continue
        handles.append(
            ax.plot(
                [min(xs), max(xs)],
                [base.y, base.y],
                color=base.style.color,
                zorder=1.5,
                **BASELINE_LINE,
            )[0]
        )
        labels.append(f"baseline: {base.group}")
    return handles, labels


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


def _draw_point(
    ax: Axes, p: _Point, axis: XAxis, frame: _Frame, metric: Metric, *, context: bool, stacked: int = 0
) -> Any:
    """One point with its error bars (shifted together by its dodge); an outlier as an
    arrowhead at the edge, with its value (``stacked`` rows of other outliers' values
    further from the edge, so close ones do not print over each other). Returns the
    legend handle."""

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
                xytext=(0, 7 + 9 * stacked if p.edge < 0 else -14 - 9 * stacked),
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
        log_ticks(ax.xaxis, axis.log, "bytes" if axis.bytes else "plain", span)
    ax.set_xlim(_inverse(axis, frame.x[0]), _inverse(axis, frame.x[1]))
    ax.set_ylim(*frame.y)
    if axis.reference is not None:
        ax.axvline(axis.reference, color="0.5", linestyle="--", linewidth=1, zorder=0)


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
    for workload in workloads(summary):
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


_Block = tuple[str, Metric, list[_Point], _Frame, bool, list[bool]]
"""A workload's block: (workload, metric, points, axes' frame, one panel per family or
not, per point whether it is on the Pareto front)."""


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
    blocks: list[_Block] = []
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
        sizes.append(grid_size(n_families, len(points)) if multiples else single_size(len(points)))
    heading = sentence(title.format(metric=title_metric(metrics)))
    fig, owners = stack(sizes, [b[0] for b in blocks], len(workloads(summary)) > 1, heading)
    for owner, block in zip(owners, blocks):
        _scatter_block(owner, block, look, axis, front)
    return Plot(fig, left_out)


def _scatter_block(owner: Any, block: _Block, look: dict[str, Style], axis: XAxis, front: bool) -> None:
    """One workload's panel, or one panel per family, with its labels and legend."""
    _, metric, points, frame, multiples, best = block
    order = look_families(look)
    handles: list[Any] = []
    labels: list[str] = []
    present = sorted(dict.fromkeys(p.style.family for p in points), key=order.index)
    axes = grid(owner, len(present)) if multiples else [owner.subplots()]
    for ax, family in zip(axes, present if multiples else [None]):
        drawn = _scatter_panel(ax, family, block, look, axis)
        handles += drawn[0]
        labels += drawn[1]
        if front:
            _staircase(ax, [p for p, b in zip(points, best) if b and not p.edge], axis, metric)
        if axis.connect:
            joined = _lines(ax, points, axis, family)
            handles += joined[0]
            labels += joined[1]
        if axis.baselines:
            marked = _baselines(ax, points, axis)
            handles += marked[0]
            labels += marked[1]
        _decorate(ax, axis, frame)
    line = axes[0].get_legend_handles_labels()
    entries = ([*line[0], *handles], [*line[1], *labels])
    if multiples:
        labels_and_legend(
            owner, axis.label, f"final {metric.heading}", *entries, "variant, workers K (seeds)"
        )
    else:
        axes[0].set_xlabel(axis.label)
        axes[0].set_ylabel(f"final {metric.heading}")
        legend(owner, *entries, "variant, workers K (seeds)")


def _scatter_panel(
    ax: Axes, family: str | None, block: _Block, look: dict[str, Style], axis: XAxis
) -> tuple[list[Any], list[str]]:
    """The points of ``family`` (every point when None; the others in grey), the ones off
    the Pareto front faded."""
    _, metric, points, frame, _, best = block
    dominated = {p.group for p, b in zip(points, best) if not b}
    handles: list[Any] = []
    labels: list[str] = []
    if family is not None:
        ax.set_title(family_title(family), fontsize="medium")
    mine = [p for p in points if family is None or p.style.family == family]
    # The values of this panel's outliers at each edge, one row each, in x order.
    rows = {
        id(p): i
        for e in (-1, 1)
        for i, p in enumerate(sorted((q for q in mine if q.edge == e), key=lambda q: q.x))
    }
    for p in sorted(points, key=lambda p: list(look).index(p.group)):
        if family is not None and p.style.family != family:
            _draw_point(ax, p, axis, frame, metric, context=True)
            continue
        handle = _draw_point(ax, p, axis, frame, metric, context=False, stacked=rows.get(id(p), 0))
        if p.group in dominated:
            _fade(handle)
        handles.append(handle)
        labels.append(p.label + (", dominated" if p.group in dominated else ""))
    return handles, labels


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
    """The primary metric against H·K: local steps between averagings times workers; the
    points of one variant and K joined by a line (Ortiz et al.'s view: do the lines of
    different K fall on one curve of H·K?), and the synchronous baseline of each K (mini-
    batch SGD, H = 1) marked by a long-dashed line at its value across that K's points."""
    part = summary[summary["period"].notna() & (summary["workers"].astype(int) > 1)].copy()
    part["period_workers"] = part["period"].astype(float) * part["workers"].astype(float)
    axis = XAxis(
        "period_workers",
        None,
        "H·K (local steps between averagings × workers, log₂ scale)",
        log=2,
        connect="workers",
        baselines=True,
    )
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
