"""Asynchronous training in the report: how many updates the evaluated model received and
how fast, a parameter server's staleness distribution and lost workers, and the primary
metric against updates.

Read from the runs' records: every metrics row's ``updates`` (and updates per second),
and a parameter server's summary in the run's status (``details["server"]``: staleness
histogram, pushes, lost workers); a simulated run with worker speeds adds its virtual time.
The section appears when some run was asynchronous (a server, or more updates than steps:
several Hogwild processes on one model).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from localsgd.records import Store
from localsgd.report.render import Block, Heading, Image, Paragraph, Table, fmt, fmt_pm
from localsgd.report.tables import Study, natural_key

STALENESS_PLOT = "staleness_distribution.png"
UPDATES_PLOT = "metric_vs_updates.png"


def run_details(study: Study) -> dict[str, dict[str, Any]]:
    """Each finished run's engine and algorithm notes (``status.json``'s ``details``)."""
    store = Store(study.root, create=False)
    return {r.run_id: dict(r.status_info.details or {}) for r in store.records() if not r.problem}


def runs_frame(study: Study) -> pd.DataFrame:
    """One row per completed run: updates and updates per second at its last evaluation,
    its server's staleness histogram, pushes and lost workers, its virtual time."""
    details = run_details(study)
    done = study.runs[study.runs["status"] == "completed"]
    metrics = study.metrics
    rows = []
    for run in done.itertuples(index=False):
        rid = str(run.run_id)
        mine = metrics[metrics["run_id"] == rid] if "updates" in metrics.columns else metrics.iloc[0:0]
        last = mine.iloc[-1] if len(mine) else None
        server = details.get(rid, {}).get("server") or {}
        histogram = {int(k): int(v) for k, v in (server.get("staleness") or {}).items()}
        rows.append(
            {
                "run_id": rid,
                "workload": run.workload,
                "group": run.group,
                "steps": _num(run.final_step),
                "updates": _num(last["updates"]) if last is not None else math.nan,
                "updates_per_second": _num(last["updates_per_second"]) if last is not None else math.nan,
                "pushes": _num(server.get("pushes")),
                "histogram": histogram,
                "lost": len(server.get("lost_workers") or {}),
                "has_server": bool(server),
                "virtual_time": _num(details.get(rid, {}).get("virtual_time")),
            }
        )
    return pd.DataFrame(rows)


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def asynchronous(frame: pd.DataFrame) -> bool:
    if frame.empty:
        return False
    more = (frame["updates"] > frame["steps"]).fillna(False)
    return bool(frame["has_server"].any() or more.any())


def quantile(histogram: Counter[int], q: float) -> float:
    """The smallest staleness at or below which a fraction ``q`` of the pushes fall."""
    total = sum(histogram.values())
    if not total:
        return math.nan
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= q * total:
            return float(value)
    return float(max(histogram))


def groups(frame: pd.DataFrame) -> pd.DataFrame:
    """Per group: seeds, mean updates, updates per second (mean ± std), the pooled
    staleness histogram over seeds with its mean and quantiles, lost workers, virtual time."""
    rows = []
    for (workload, group), part in frame.groupby(["workload", "group"], sort=False):
        pooled: Counter[int] = Counter()
        for h in part["histogram"]:
            pooled.update(h)
        total = sum(pooled.values())
        rows.append(
            {
                "workload": workload,
                "group": group,
                "seeds": len(part),
                "updates": part["updates"].mean(),
                "ups_mean": part["updates_per_second"].mean(),
                "ups_std": part["updates_per_second"].std(ddof=1),
                "pushes": part["pushes"].mean() if part["has_server"].any() else math.nan,
                "histogram": dict(pooled),
                "staleness_mean": sum(k * v for k, v in pooled.items()) / total if total else math.nan,
                "staleness_p50": quantile(pooled, 0.5),
                "staleness_p90": quantile(pooled, 0.9),
                "staleness_max": float(max(pooled)) if pooled else math.nan,
                "lost": int(part["lost"].sum()),
                "virtual_time": part["virtual_time"].mean(),
            }
        )
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    order = sorted(range(len(out)), key=lambda i: (natural_key(str(out["workload"][i])), i))
    return out.iloc[order].reset_index(drop=True)


def staleness_plot(summary: pd.DataFrame) -> bytes:
    """Fraction of pushes at each staleness, one line per configuration with a server."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    part = summary[summary["histogram"].map(bool)]
    colors = colormaps["tab20"] if len(part) > 10 else colormaps["tab10"]
    markers = "osD^vP<>Xh*p"
    for i, row in enumerate(part.itertuples(index=False)):
        total = sum(row.histogram.values())
        xs = sorted(row.histogram)
        ys = [row.histogram[x] / total for x in xs]
        label = f"{row.group}" + (f" ({row.workload})" if part["workload"].nunique() > 1 else "")
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=colors(i % colors.N), markersize=5, label=label)
    ax.set_xlabel("staleness τ (updates a push did not see)")
    ax.set_ylabel("fraction of pushes")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _png(fig)


def updates_plot(study: Study, names: list[str]) -> bytes:
    """The primary metric against updates of the evaluated model (mean over seeds), a
    panel per workload, log-scaled updates."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    workloads = sorted({str(w) for w in study.runs["workload"]}, key=natural_key)
    fig = Figure(figsize=(10.0, 4.6 * len(workloads)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(len(workloads), 1))
    done = study.runs[study.runs["status"] == "completed"]
    for ax, workload in zip(axes, workloads):
        metric = study.primary(workload)
        if metric is None:
            continue
        mine = done[done["workload"] == workload]
        groups_here = [g for g in dict.fromkeys(mine["group"]) if g in names]
        colors = colormaps["tab20"] if len(groups_here) > 10 else colormaps["tab10"]
        for i, group in enumerate(groups_here):
            ids = set(mine[mine["group"] == group]["run_id"])
            rows = study.metrics[study.metrics["run_id"].isin(ids)]
            rows = rows.dropna(subset=["updates", metric.name])
            if rows.empty:
                continue
            # Rows at the same evaluation index across seeds: mean updates, mean metric.
            rows = rows.assign(index=rows.groupby("run_id").cumcount())
            mean = rows.groupby("index")[["updates", metric.name]].mean()
            ax.plot(
                mean["updates"],
                mean[metric.name] * metric.scale,
                marker="os^Dv<>P"[i % 8],
                markersize=4,
                color=colors(i % colors.N),
                label=str(group),
            )
        ax.set_xscale("log")
        ax.set_xlabel("updates of the evaluated model")
        ax.set_ylabel(metric.heading)
        ax.set_title(str(workload), fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _png(fig)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def section(study: Study) -> tuple[list[Block], dict[str, bytes]]:
    """The report's "asynchronous training" section and its figures, by file name; nothing
    when no run was asynchronous."""
    frame = runs_frame(study)
    if not asynchronous(frame):
        return [], {}
    summary = groups(frame)
    has_server = summary["histogram"].map(bool).any()
    has_time = summary["virtual_time"].notna().any()
    headers = ["workload", "configuration", "seeds", "updates", "updates/s"]
    if has_server:
        headers += ["pushes", "staleness mean", "p50", "p90", "max", "lost workers"]
    if has_time:
        headers.append("virtual time")
    rows = []
    for r in summary.itertuples(index=False):
        cells = [str(r.workload), str(r.group), str(r.seeds), fmt(r.updates, ".0f"), fmt_pm(r.ups_mean, r.ups_std, ".3g")]
        if has_server:
            cells += [
                fmt(r.pushes, ".0f"),
                fmt(r.staleness_mean, ".3g"),
                fmt(r.staleness_p50, ".0f"),
                fmt(r.staleness_p90, ".0f"),
                fmt(r.staleness_max, ".0f"),
                str(r.lost) if r.histogram else "",
            ]
        if has_time:
            cells.append(fmt(r.virtual_time, ".4g"))
        rows.append(cells)
    blocks: list[Block] = [
        Heading(2, "Asynchronous training"),
        Paragraph(
            "Updates: the updates the evaluated model received by the last evaluation (one per step "
            "for synchronous algorithms, every process's step under Hogwild, the server's updates under "
            "a parameter server), and per second of training (mean ± std over seeds). A push's staleness τ "
            "is the number of updates applied between the model its worker started from and the push "
            "(pooled over seeds; p50 and p90 are quantiles); lost workers died during the run, which went "
            "on without them. Virtual time: simulated runs with worker speeds, in steps of a worker of "
            "speed 1 (asynchronous: when the last worker finished; synchronous: every step waiting for "
            "the slowest)."
        ),
        Table(headers, rows),
    ]
    images: dict[str, bytes] = {}
    names = list(summary["group"])
    images[UPDATES_PLOT] = updates_plot(study, names)
    blocks.append(Image(UPDATES_PLOT, "Primary metric against updates of the evaluated model (mean over seeds)"))
    if has_server:
        images[STALENESS_PLOT] = staleness_plot(summary)
        blocks.append(Image(STALENESS_PLOT, "Staleness distribution of the pushes (pooled over seeds)"))
    return blocks, images
