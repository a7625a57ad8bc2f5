"""The H·K trade-off of local SGD in the report (Ortiz et al. 2021: "trade-off is better
expressed as H·K, the number of local model updates between synchronizations"): the final
primary metric against H·K, one line per worker count K across its periods H, with the
synchronous baseline of that K (mini-batch SGD: gradients averaged every step) as a
long-dashed line in the same colour, in a ± std band. Mean ± std over seeds as error bars.

One panel per workload, setting (the learning-rate schedule, when the study varies it) and
variant without H (local SGD; hierarchical local SGD at one block size; ...). The section
(:mod:`~localsgd.report.sections.hk`) appears when some variant sweeps H (two periods or
more at one K); variants with a switch point have their own figure
(:mod:`~localsgd.report.switch_plots`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure

from localsgd.records import Metric
from localsgd.report.graphics import (
    BASELINE_LINE,
    MARKERS,
    add_entries,
    grid,
    grid_size,
    labels_and_legend,
    sentence,
    stack,
    title_metric,
)
from localsgd.report.labels import synchronous_baseline
from localsgd.report.tables import natural_key

PANEL = ["workload", "setting", "line_variant"]


def _with_setting(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with a ``setting`` column (empty when no other config key varies)."""
    return summary if "setting" in summary.columns else summary.assign(setting="")


def _panels(summary: pd.DataFrame) -> pd.DataFrame:
    """The K > 1 groups of the variants that sweep H at some K, with ``hk`` = H·K."""
    summary = _with_setting(summary)
    part = summary[summary["period"].notna() & (summary["workers"].astype(int) > 1)].copy()
    part = part[~part["algorithm"].astype(str).map(synchronous_baseline)]
    if part.empty:
        return part.assign(hk=pd.Series(dtype=float))
    part["hk"] = part["period"].astype(float) * part["workers"].astype(float)
    sweeps = part.groupby([*PANEL, "workers"])["period"].transform("nunique") > 1
    keep = part[sweeps][PANEL].drop_duplicates()
    return part.merge(keep, on=PANEL)


def has_sweep(summary: pd.DataFrame) -> bool:
    return not _panels(summary).empty


def _colors(workers: Sequence[int]) -> dict[int, Any]:
    """One colour per K, ordered from few workers (light) to many (dark)."""
    ordered = sorted(set(workers))
    cmap = colormaps["viridis"]
    return {k: cmap(0.85 - 0.75 * i / max(len(ordered) - 1, 1)) for i, k in enumerate(ordered)}


def _panel(
    ax: Axes, lines: pd.DataFrame, baselines: pd.DataFrame, value: str, scale: float, colors: dict[int, Any]
) -> tuple[list[Any], list[str]]:
    handles: list[Any] = []
    labels: list[str] = []
    for i, (workers, part) in enumerate(sorted(lines.groupby("workers"), key=lambda kv: int(kv[0]))):
        part = part.sort_values("hk")
        color = colors[int(workers)]
        std = part[f"{value}_std"].fillna(0.0).astype(float) * scale
        handle = ax.errorbar(
            part["hk"],
            part[f"{value}_mean"].astype(float) * scale,
            yerr=std,
            color=color,
            marker=MARKERS[i % len(MARKERS)],
            markersize=6,
            markeredgecolor="white",
            capsize=3,
            linewidth=1.6,
            zorder=3,
        )
        seeds = sorted({int(n) for n in part["n_seeds"]})
        handles.append(handle)
        labels.append(f"K={int(workers)}, H = {', '.join(_h(h) for h in part['period'])} (n={seeds[0]})")
        base = baselines[baselines["workers"] == workers]
        if base.empty:
            continue
        mean = float(base[f"{value}_mean"].iloc[0]) * scale
        spread = float(base[f"{value}_std"].iloc[0]) * scale
        low, high = float(part["hk"].min()), float(part["hk"].max())
        if math.isfinite(spread) and spread > 0:
            ax.fill_between([low, high], mean - spread, mean + spread, color=color, alpha=0.15, linewidth=0)
        handles.append(ax.plot([low, high], [mean, mean], color=color, zorder=2, **BASELINE_LINE)[0])
        labels.append(f"{base['variant'].iloc[0]}, K={int(workers)} (n={int(base['n_seeds'].iloc[0])})")
    ax.set_xscale("log", base=2)
    ticks = sorted({float(h) for h in lines["hk"]})
    ax.set_xticks(ticks, [_h(t) for t in ticks])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    return handles, labels


def _h(value: float) -> str:
    return f"{value:g}"


def metric_vs_hk(summary: pd.DataFrame, metrics: dict[str, Metric]) -> MplFigure | None:
    """Per workload a row of panels (one per setting and variant that sweeps H); None when
    no variant does."""
    summary = _with_setting(summary)
    part = _panels(summary)
    shown = [w for w in sorted(set(part["workload"].astype(str)), key=natural_key) if w in metrics]
    if not shown:
        return None
    colors = _colors([int(k) for k in summary["workers"] if int(k) > 1])
    panels = {
        w: sorted(
            {(str(s), str(v)) for s, v in part.loc[part["workload"] == w, ["setting", "line_variant"]].values},
            key=lambda p: (natural_key(p[1]), natural_key(p[0])),
        )
        for w in shown
    }
    sizes = [grid_size(len(panels[w]), part[part["workload"] == w]["workers"].nunique() * 2) for w in shown]
    title = sentence(f"final {title_metric({w: metrics[w] for w in shown})} against H·K, one line per K")
    fig, owners = stack(sizes, shown, len(shown) > 1, title)
    for owner, workload in zip(owners, shown):
        metric = metrics[workload]
        axes = grid(owner, len(panels[workload]))
        handles: list[Any] = []
        labels: list[str] = []
        for ax, (setting, variant) in zip(axes, panels[workload]):
            ax.set_title(variant + (f" [{setting}]" if setting else ""), fontsize="medium")
            mine = summary[(summary["workload"] == workload) & (summary["setting"].astype(str) == setting)]
            lines = part[
                (part["workload"] == workload)
                & (part["setting"].astype(str) == setting)
                & (part["line_variant"] == variant)
            ]
            base = mine[mine["algorithm"].astype(str).map(synchronous_baseline) & (mine["workers"] > 1)]
            drawn = _panel(ax, lines, base, f"final_{metric.name}", metric.scale, colors)
            add_entries(handles, labels, drawn)
        labels_and_legend(
            owner,
            "H·K (local steps between averagings × workers, log₂ scale)",
            f"final {metric.heading}",
            handles,
            labels,
            "workers K (seeds); dashed: the synchronous baseline",
        )
    return fig

