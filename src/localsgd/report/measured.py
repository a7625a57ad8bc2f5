"""Measured beside estimated: for runs whose wall time is a real K-worker time (worker
processes, on one machine or an emulated cluster), the training time they took against
the cost model's estimate for the cluster of the report, one table and one plot.

The estimate's compute part is each run's own measured compute when the cluster has no
``seconds_per_sample`` (as in the rest of the report), so there the comparison tests the
communication part: the network model plus any injected delay (``comm.delay``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from localsgd.report import graphics
from localsgd.report.estimates import ClusterEstimates
from localsgd.report.tables import natural_key

PLOT = "measured_vs_estimated"
BAND = 0.15
"""The plot shades estimates within ±15 % of the measurement."""


def groups(estimates: ClusterEstimates) -> pd.DataFrame:
    """Per group of completed multi-worker runs with a real wall time: mean ± std over
    seeds of the measured and estimated seconds and of their ratio (measured / estimated)."""
    runs = estimates.study.runs
    keep = (runs["status"] == "completed") & (runs["workers"] > 1) & runs["real_wall_time"].astype(bool)
    runs = runs[keep].assign(
        ratio=lambda r: r["wall_seconds"] / r["est_total_seconds"],
        comm_ratio=lambda r: r["comm_seconds"] / r["est_comm_seconds"],
    )
    columns = {
        "wall_seconds": "measured_total",
        "comm_seconds": "measured_comm",
        "est_total_seconds": "est_total",
        "est_comm_seconds": "est_comm",
        "ratio": "ratio",
        "comm_ratio": "comm_ratio",
    }
    rows: list[dict[str, Any]] = []
    for (workload, group), part in runs.groupby(["workload", "group"], sort=False):
        row: dict[str, Any] = {"workload": workload, "group": group, "seeds": len(part)}
        for source, name in columns.items():
            row[f"{name}_mean"] = part[source].mean()
            row[f"{name}_std"] = part[source].std(ddof=1)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = sorted(range(len(frame)), key=lambda i: (natural_key(str(frame["workload"][i])), i))
    return frame.iloc[order].reset_index(drop=True)


def plot(frame: pd.DataFrame, cluster: str, look: dict[str, graphics.Style]) -> MplFigure:
    """Measured against estimated training time, one point per group (error bars: std
    over seeds, on both axes), log-log, with y = x and a ±15 % band; each group in its
    family's colour and marker, as in every figure of the report."""
    title = f"Measured against estimated training time on {cluster} (mean ± std over seeds)"
    fig, (owner,) = graphics.stack([graphics.single_size(len(frame))], [], False, title)
    ax = owner.subplots()
    low = min(frame["est_total_mean"].min(), frame["measured_total_mean"].min()) / 1.5
    high = max(frame["est_total_mean"].max(), frame["measured_total_mean"].max()) * 1.5
    line = np.geomspace(low, high, 50)
    ax.plot(line, line, color="0.3", linewidth=1, label="measured = estimated")
    ax.fill_between(line, line * (1 - BAND), line * (1 + BAND), color="0.88", label=f"±{BAND:.0%}")
    several = frame["workload"].nunique() > 1
    for row in frame.itertuples(index=False):
        style = look[str(row.group)]
        ax.errorbar(
            row.est_total_mean,
            row.measured_total_mean,
            xerr=_std(row.est_total_std),
            yerr=_std(row.measured_total_std),
            fmt=style.marker,
            color=style.color,
            markersize=7,
            markeredgecolor="white",
            markeredgewidth=0.7,
            capsize=3,
            label=f"{row.group}" + (f" ({row.workload})" if several else ""),
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    span = np.log10(high / low)
    for axis in (ax.xaxis, ax.yaxis):
        graphics.log_ticks(axis, 10, "plain", span)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel(f"estimated training time on {cluster} (s, log scale)")
    ax.set_ylabel("measured training time (s, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    graphics.legend(owner, handles, labels, "variant, workers K")
    return fig


def _std(value: float) -> float:
    return float(value) if np.isfinite(value) else 0.0

