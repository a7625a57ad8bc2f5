"""The report's training curves: each configuration's mean over seeds at every evaluation
step in a band of ± one std, against epochs, wall time or estimated time. Conventions in
:mod:`~localsgd.report.graphics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from localsgd.report.graphics import (
    CONTEXT,
    Metrics,
    Plot,
    Style,
    grid,
    grid_size,
    labels_and_legend,
    legend,
    log_ticks,
    sentence,
    single_size,
    stack,
    workloads,
)
from localsgd.report.labels import family_title

SINGLE_CURVES_MAX = 5
"""More groups than this (of several families) draw curves as small multiples."""


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


CurveBlock = tuple[str, tuple[str, float, str], dict[str, pd.DataFrame], list[str], bool]
"""A workload's block: (workload, (y column, scale, y label), lines by group, families
present, one panel per family or not)."""


def _curve_blocks(
    curves: pd.DataFrame, look: dict[str, Style], x: str, y_of: YSpec
) -> tuple[list[CurveBlock], dict[str, str]]:
    """Per workload with something to draw its block; per workload left out, why."""
    left_out: dict[str, str] = {}
    blocks: list[CurveBlock] = []
    for workload in workloads(curves):
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
    return blocks, left_out


def _curve_panel(
    ax: Axes,
    family: str | None,
    lines: dict[str, pd.DataFrame],
    look: dict[str, Style],
    xy: tuple[str, str, float],
    log_y: bool,
) -> tuple[list[Any], list[str]]:
    """The lines of ``family`` (every line when None; the others in grey behind them)."""
    x, y, scale = xy
    handles, labels = [], []
    if family is not None:
        ax.set_title(family_title(family), fontsize="medium")
        for g, ln in lines.items():
            if look[g].family != family:
                _line(ax, ln, x, y, scale, look[g], context=True, log_y=log_y)
    for g, ln in lines.items():
        if family is None or look[g].family == family:
            handles.append(_line(ax, ln, x, y, scale, look[g], context=False, log_y=log_y))
            labels.append(g)
    ax.grid(True, alpha=0.3)
    if log_y:
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        log_ticks(ax.yaxis, 10, "plain", math.log10(high / low))
    return handles, labels


def _curve_block(
    owner: Any, block: CurveBlock, look: dict[str, Style], x: str, xlabel: str, log_y: bool
) -> None:
    """One workload's panel, or one panel per family, with its labels and legend."""
    _, (y, scale, ylabel), lines, present, multiples = block
    positive = log_y and all((ln[y].astype(float).dropna() > 0).all() for ln in lines.values())
    handles: list[Any] = []
    labels: list[str] = []
    axes = grid(owner, len(present)) if multiples else [owner.subplots()]
    for ax, family in zip(axes, present if multiples else [None]):
        drawn = _curve_panel(ax, family, lines, look, (x, y, scale), positive)
        handles += drawn[0]
        labels += drawn[1]
    label = f"{ylabel}, log scale" if positive else ylabel
    if multiples:
        labels_and_legend(owner, xlabel, label, handles, labels, "variant, workers K")
    else:
        axes[0].set_xlabel(xlabel)
        axes[0].set_ylabel(label)
        legend(owner, handles, labels, "variant, workers K")


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
    blocks, left_out = _curve_blocks(curves, look, x, y_of)
    if not blocks:
        return Plot(None, left_out)
    sizes = [
        grid_size(len(present), len(lines)) if multiples else single_size(len(lines))
        for _, _, lines, present, multiples in blocks
    ]
    names = list(dict.fromkeys(spec[2].split(" (")[0] for _, spec, _, _, _ in blocks))
    heading = sentence(title.format(metric=names[0] if len(names) == 1 else "primary metric"))
    fig, owners = stack(sizes, [b[0] for b in blocks], len(workloads(curves)) > 1, heading)
    for owner, block in zip(owners, blocks):
        _curve_block(owner, block, look, x, xlabel, log_y)
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
