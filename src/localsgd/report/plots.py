"""The report's figures, as PNG bytes: one panel per workload, legends outside the axes.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through
``pyplot``, so reporting changes no global matplotlib state and needs no display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, ScalarFormatter

from localsgd.records import Metric
from localsgd.report.render import fmt_bytes
from localsgd.report.tables import natural_key

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
DPI = 110


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Style:
    color: Any
    marker: str
    linestyle: str


def styles(summary: pd.DataFrame) -> dict[str, Style]:
    """One look per group, shared by every figure: color per variant, marker and line style
    per worker count K. When B, lr or another setting splits a (variant, K) pair into
    several groups, each group gets its own color instead."""
    groups = list(summary["group"])
    workers = sorted(summary["workers"].unique())
    marker = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(workers)}
    line = {k: LINESTYLES[i % len(LINESTYLES)] for i, k in enumerate(workers)}
    pairs = list(zip(summary["workload"], summary["variant"], summary["workers"]))
    if len(set(pairs)) == len(pairs):
        variants = list(dict.fromkeys(summary["variant"]))
        colors = dict(zip(variants, _palette(len(variants))))
        color = {g: colors[v] for g, v in zip(groups, summary["variant"])}
    else:
        color = dict(zip(groups, _palette(len(groups))))
    return {g: Style(color[g], marker[k], line[k]) for g, k in zip(groups, summary["workers"])}


class _BytesLogFormatter(LogFormatter):
    """Log-axis tick labels as ``400 kB``, ``1 MB``; which ticks get a label is
    ``LogFormatter``'s choice (decades, plus some minor ticks on a short axis)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return fmt_bytes(x) if super().__call__(x, pos) else ""


def _bytes_axis(ax: Axes, part: pd.DataFrame) -> None:
    ax.xaxis.set_major_formatter(_BytesLogFormatter())
    ax.xaxis.set_minor_formatter(_BytesLogFormatter())


def _workloads(frame: pd.DataFrame) -> list[str]:
    return sorted({str(w) for w in frame["workload"]}, key=natural_key) if len(frame) else []


# Up to this many legend entries sit right of a panel; more go below it, in columns.
LEGEND_SIDE_MAX = 12
LEGEND_BELOW_COLUMNS = 3


def _figure(panels: int, entries: int = 0) -> tuple[Figure, list[Axes]]:
    """``panels`` stacked panels; each grows to leave room for a legend of ``entries``
    lines placed below it."""
    panels = max(panels, 1)
    legend_rows = math.ceil(entries / LEGEND_BELOW_COLUMNS) if entries > LEGEND_SIDE_MAX else 0
    height = 4.6 + 0.24 * legend_rows
    width = 10.0 if legend_rows else 11.0  # a legend at the side takes width
    fig = Figure(figsize=(width, height * panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # Constrained layout already fits legends and labels; "tight" also rescues a title
    # wider than its panel instead of clipping it.
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _legend(ax: Axes, title: str | None = None) -> None:
    handles = ax.get_legend_handles_labels()[0]
    if not handles:
        return
    common: dict[str, Any] = {
        "fontsize": "small",
        "title": title,
        "title_fontsize": "small",
        "frameon": False,
    }
    if len(handles) <= LEGEND_SIDE_MAX:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), **common)
    else:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=LEGEND_BELOW_COLUMNS, **common)


def _no_data(ax: Axes, why: str) -> None:
    ax.text(
        0.5,
        0.5,
        why,
        ha="center",
        va="center",
        transform=ax.transAxes,
        wrap=True,
        fontsize="medium",
        color="0.35",
    )


def _std(value: Any) -> float:
    return 0.0 if value is None or not math.isfinite(float(value)) else float(value)


Metrics = dict[str, Metric]
"""Per workload, the metric a figure shows (its primary metric)."""


def _scatter(
    summary: pd.DataFrame,
    x_of: Callable[[pd.DataFrame], pd.Series],
    look: dict[str, Style],
    metrics: Metrics,
    *,
    title: str,
    xlabel: str,
    why_empty: str,
    log_x: int | None = None,
    decorate: Callable[[Axes, pd.DataFrame], None] | None = None,
) -> bytes:
    """Each workload's final primary metric (mean ± std over seeds) against an x, one
    point and one legend entry per group. ``title`` may hold ``{metric}``."""
    workloads = _workloads(summary)
    entries = max((int((summary["workload"] == w).sum()) for w in workloads), default=0)
    fig, axes = _figure(len(workloads), entries)
    if not workloads:
        axes[0].set_title(title.format(metric="metric"))
        _no_data(axes[0], why_empty)
        return _png(fig)
    for ax, workload in zip(axes, workloads):
        metric = metrics.get(workload)
        ax.set_title(f"{workload}: {title.format(metric=metric.title if metric else 'metric')}")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if metric is None or f"final_{metric.name}_mean" not in summary.columns:
            _no_data(ax, "no completed run declared a metric")
            continue
        mean, std = f"final_{metric.name}_mean", f"final_{metric.name}_std"
        ax.set_ylabel(f"final {metric.heading}")
        part = summary[summary["workload"] == workload].copy()
        part["x"] = x_of(part)
        part = part[np.isfinite(part["x"].astype(float)) & np.isfinite(part[mean].astype(float))]
        if part.empty:
            _no_data(ax, why_empty)
            continue
        for row in part.to_dict("records"):
            ax.errorbar(
                float(row["x"]),
                metric.scale * float(row[mean]),
                yerr=metric.scale * _std(row[std]),
                fmt=look[row["group"]].marker,
                color=look[row["group"]].color,
                markersize=8,
                capsize=4,
                label=f"{row['group']} (n={row['n_seeds']})",
            )
        ax.margins(x=0.08, y=0.12)  # keep points and error bars off the frame
        if log_x:
            ax.set_xscale("log", base=log_x)
        if decorate:
            decorate(ax, part)
        _legend(ax, "variant, workers K (seeds)")
    return _png(fig)


def _baseline_line(ax: Axes, part: pd.DataFrame) -> None:
    ax.axvline(1.0, color="0.5", linestyle="--", linewidth=1)
    ax.text(
        1.0,
        0.01,
        " K=1 baseline",
        transform=ax.get_xaxis_transform(),
        va="bottom",
        fontsize="small",
        color="0.4",
    )


def metric_vs_speedup(summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> bytes:
    """The headline: what each variant buys in time and costs in its primary metric."""
    return _scatter(
        summary,
        lambda part: part["speedup"].astype(float),
        look,
        metrics,
        title="final {metric} against speedup (mean ± std over seeds)",
        xlabel="speedup over one worker (K=1 mean wall time / mean wall time, ×)",
        why_empty="no speedup to plot: the store has no completed K=1 run of this workload",
        decorate=_baseline_line,
    )


def metric_vs_est_speedup(
    summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics, cluster: str
) -> bytes:
    """The headline again, with times estimated on ``cluster`` by the cost model."""
    return _scatter(
        summary,
        lambda part: part["est_speedup"].astype(float),
        look,
        metrics,
        title=f"final {{metric}} against estimated speedup on cluster {cluster}",
        xlabel=f"estimated speedup over one worker on {cluster} (K=1 mean est. time / mean est. time, ×)",
        why_empty="no estimated speedup: no completed K=1 run of this workload, or no compute time",
        decorate=_baseline_line,
    )


def metric_vs_bytes(summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> bytes:
    """The primary metric against communication volume; K=1 runs (0 bytes) have no place
    on a log axis and are left out."""
    return _scatter(
        summary[summary["bytes_mean"].astype(float) > 0],
        lambda part: part["bytes_mean"].astype(float),
        look,
        metrics,
        title="final {metric} against communication (K=1 runs, 0 bytes, omitted)",
        xlabel="communication payload per worker over the run (bytes, log scale; kB = 1000 B)",
        why_empty="no run communicated (only K=1 runs)",
        log_x=10,
        decorate=_bytes_axis,
    )


def metric_vs_period_workers(summary: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> bytes:
    """The primary metric against H·K: local steps between averagings times workers."""
    part = summary[summary["period"].notna()]
    return _scatter(
        part,
        lambda p: p["period"].astype(float) * p["workers"].astype(float),
        look,
        metrics,
        title="final {metric} against H·K (synchronous algorithms: H=1)",
        xlabel="H·K (local steps between averagings × workers, log₂ scale)",
        why_empty="no run of an algorithm with a period H",
        log_x=2,
    )


YSpec = Callable[[str], tuple[str, float, str] | None]
"""Per workload: (column, scale, y label) of a curve, or None when there is nothing."""


def _metric_y(metrics: Metrics) -> YSpec:
    def spec(workload: str) -> tuple[str, float, str] | None:
        m = metrics.get(workload)
        return (m.name, m.scale, m.heading) if m else None

    return spec


def _train_loss_y(workload: str) -> tuple[str, float, str]:
    return ("train_loss", 1.0, "train loss (mean since the previous evaluation)")


def _curves(
    curves: pd.DataFrame,
    look: dict[str, Style],
    x: str,
    y_of: YSpec,
    *,
    title: str,
    xlabel: str,
    log_y: bool = False,
) -> bytes:
    """One line per group (mean over its completed seeds at each evaluation step)."""
    workloads = _workloads(curves)
    entries = max((curves.loc[curves["workload"] == w, "group"].nunique() for w in workloads), default=0)
    fig, axes = _figure(len(workloads), entries)
    if not workloads:
        axes[0].set_title(title.format(metric="metric"))
        _no_data(axes[0], "no completed run with evaluation rows")
        return _png(fig)
    for ax, workload in zip(axes, workloads):
        part = curves[curves["workload"] == workload]
        spec = y_of(workload)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if spec is None or spec[0] not in part.columns:
            ax.set_title(f"{workload}: {title.format(metric='metric')}")
            _no_data(ax, "no completed run declared a metric")
            continue
        y, scale, ylabel = spec
        ax.set_title(f"{workload}: {title.format(metric=ylabel.split(' (')[0])}")
        ax.set_ylabel(ylabel)
        positive = True
        for group in look:
            line = part[part["group"] == group].sort_values("step")
            values = line[y].astype(float) * scale
            if line.empty or not np.isfinite(values).any():
                continue
            positive = positive and bool((values[np.isfinite(values)] > 0).all())
            ax.plot(
                line[x].astype(float),
                values,
                marker=look[group].marker,
                markersize=4,
                linewidth=1.5,
                linestyle=look[group].linestyle,
                color=look[group].color,
                label=group,
            )
        if log_y and positive:
            ax.set_yscale("log")
            # Plain numbers (0.6, 2) rather than 6×10⁻¹ on a loss axis spanning < 2 decades.
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.set_ylabel(f"{ylabel}, log scale")
        _legend(ax, "variant, workers K")
    return _png(fig)


EPOCHS = "epoch (passes over the training set)"
WALL = "wall time (s, training only, evaluation excluded)"


def metric_vs_epochs(curves: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> bytes:
    return _curves(
        curves,
        look,
        "epoch",
        _metric_y(metrics),
        title="{metric} during training (mean over seeds)",
        xlabel=EPOCHS,
    )


def metric_vs_wall_time(curves: pd.DataFrame, look: dict[str, Style], metrics: Metrics) -> bytes:
    return _curves(
        curves,
        look,
        "wall_seconds",
        _metric_y(metrics),
        title="{metric} against training time (mean over seeds)",
        xlabel=WALL,
    )


def metric_vs_est_time(curves: pd.DataFrame, look: dict[str, Style], metrics: Metrics, cluster: str) -> bytes:
    return _curves(
        curves,
        look,
        "est_total_seconds",
        _metric_y(metrics),
        title=f"{{metric}} against estimated training time on cluster {cluster} (mean over seeds)",
        xlabel=f"estimated time on {cluster} (s, compute + communication, evaluation excluded)",
    )


def train_loss_vs_epochs(curves: pd.DataFrame, look: dict[str, Style]) -> bytes:
    return _curves(
        curves,
        look,
        "epoch",
        _train_loss_y,
        log_y=True,
        title="train loss during training (mean over workers and seeds)",
        xlabel=EPOCHS,
    )


def train_loss_vs_wall_time(curves: pd.DataFrame, look: dict[str, Style]) -> bytes:
    return _curves(
        curves,
        look,
        "wall_seconds",
        _train_loss_y,
        log_y=True,
        title="train loss against training time (mean over workers and seeds)",
        xlabel=WALL,
    )
