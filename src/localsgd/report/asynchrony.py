"""Asynchronous training in the report: how many updates the evaluated model received and
how fast, a parameter server's staleness distribution and lost workers, and the primary
metric against updates.

Read from the runs' records: every metrics row's ``updates`` (and updates per second),
and a parameter server's summary in the run's status (``details["server"]``: staleness
histogram, pushes, lost workers); a simulated run with worker speeds adds its virtual time.
Figures follow :mod:`~localsgd.report.graphics` (each group in its family's colour and marker).
The section (:mod:`~localsgd.report.sections.asynchrony`) appears when some run was
asynchronous (a server, or more updates than steps: several Hogwild processes on one model).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pandas as pd
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

from localsgd.records import Metric, Store
from localsgd.report import graphics
from localsgd.report.rounding import number
from localsgd.report.tables import Study, natural_key


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
                "variant": str(run.variant),
                "engine": str(run.engine),
                "workers": int(run.workers),
                "steps": number(run.final_step),
                "updates": number(last["updates"]) if last is not None else math.nan,
                "updates_per_second": number(last["updates_per_second"]) if last is not None else math.nan,
                "pushes": number(server.get("pushes")),
                "histogram": histogram,
                "lost": len(server.get("lost_workers") or {}),
                "has_server": bool(server),
                "virtual_time": number(details.get(rid, {}).get("virtual_time")),
            }
        )
    return pd.DataFrame(rows)


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
                "variant": part["variant"].iloc[0],
                "engine": part["engine"].iloc[0],
                "workers": int(part["workers"].iloc[0]),
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


def staleness_plot(summary: pd.DataFrame) -> MplFigure:
    """The cumulative distribution of the pushes' staleness (fraction of pushes with τ ≤ x),
    one panel per worker count K (staleness scales with K; each panel its own τ range), one
    line per configuration with a server: its line style and marker the variant's, its
    colour the engine's (with the engine's options: worker speeds, say), which is what
    shapes the distribution most; one legend for both, K left to the panel titles."""
    from matplotlib.lines import Line2D

    part = summary[summary["histogram"].map(bool)]
    counts = sorted({int(k) for k in part["workers"]})
    several = part["workload"].nunique() > 1
    variants = sorted(
        dict.fromkeys(
            str(v) + (f" ({w})" if several else "") for v, w in zip(part["variant"], part["workload"])
        ),
        key=natural_key,
    )
    engines = sorted(dict.fromkeys(str(e) for e in part["engine"]), key=natural_key)
    colors = dict(zip(engines, graphics.palette(len(engines))))
    look: dict[str, tuple[Any, str]] = {
        v: (graphics.LINESTYLES[i % len(graphics.LINESTYLES)], graphics.MARKERS[i % len(graphics.MARKERS)])
        for i, v in enumerate(variants)
    }
    entries = len(variants) + (len(engines) if len(engines) > 1 else 0)
    title = "Staleness of the pushes to the parameter server (cumulative, pooled over seeds)"
    fig, (owner,) = graphics.stack([graphics.grid_size(len(counts), entries)], [], False, title)
    ncols = min(3, len(counts))
    axes = owner.subplots(math.ceil(len(counts) / ncols), ncols, squeeze=False, sharey=True).flat
    for ax, k in zip(axes, counts):
        for row in part[part["workers"] == k].itertuples(index=False):
            linestyle, marker = look[str(row.variant) + (f" ({row.workload})" if several else "")]
            color = colors[str(row.engine)]
            total = sum(row.histogram.values())
            xs = sorted(row.histogram)
            ys = [sum(row.histogram[x] for x in xs[: i + 1]) / total for i in range(len(xs))]
            ax.step([0, *xs], [0.0, *ys], where="post", color=color, linestyle=linestyle, linewidth=1.4)
            ax.plot(
                xs,
                ys,
                linestyle="none",
                marker=marker,
                markevery=max(1, len(xs) // 10),
                markersize=3.5,
                color=color,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # staleness counts updates
        ax.set_title(f"K = {k}", fontsize="medium")
        ax.set_xlabel("staleness τ (updates a push did not see)")
        ax.grid(True, alpha=0.3)
    for ax in list(axes)[len(counts) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("fraction of pushes with staleness ≤ τ")
    one = len(engines) == 1
    ink = colors[engines[0]] if one else graphics.CONTEXT_DARK
    handles: list[Any] = [
        Line2D([], [], color=ink, linestyle=ls, marker=m, markersize=3.5, linewidth=1.4)
        for ls, m in look.values()
    ]
    labels = list(look)
    if not one:
        handles += [Line2D([], [], color=colors[e], linewidth=2.5) for e in engines]
        labels += engines
    heading = "variant (line)" if one else "variant (line and marker), engine (colour)"
    graphics.legend(owner, handles, labels, heading + (f"; engine {engines[0]}" if one else ""))
    return fig


Encoding = tuple[dict[str, Any], dict[str, Any], dict[str, str]]
"""Colours by variant, line styles by engine, markers by variant."""


def _encoding(variants: list[str], engines: list[str]) -> Encoding:
    """Colours by variant, line styles by engine (with its options), markers by variant."""
    colors = dict(zip(variants, graphics.palette(len(variants))))
    lines = {e: graphics.LINESTYLES[i % len(graphics.LINESTYLES)] for i, e in enumerate(engines)}
    markers = {v: graphics.MARKERS[i % len(graphics.MARKERS)] for i, v in enumerate(variants)}
    return colors, lines, markers


UpdateLines = dict[tuple[int, str, str], pd.DataFrame]
"""Per (K, variant, engine): mean updates and mean metric at each evaluation index."""


def _update_lines(study: Study, runs: pd.DataFrame, metric: Metric) -> pd.DataFrame | None:
    """The mean over seeds, at each evaluation index, of ``runs``' updates and metric; None
    without an evaluation after an update."""
    rows = study.metrics[study.metrics["run_id"].isin(set(runs["run_id"]))]
    rows = rows.dropna(subset=["updates", metric.name])
    rows = rows[rows["updates"] > 0]
    if not len(rows):
        return None
    # Rows at the same evaluation index across seeds: mean updates, mean metric.
    rows = rows.assign(index=rows.groupby("run_id").cumcount())
    return rows.groupby("index")[["updates", metric.name]].mean()


def _update_panels(study: Study, groups_shown: list[str]) -> list[tuple[str, Metric, UpdateLines]]:
    """Per workload with a primary metric and updates: its metric and lines."""
    done = study.runs[study.runs["status"] == "completed"]
    panels = []
    for workload in graphics.workloads(done):
        metric = study.primary(workload)
        if metric is None or "updates" not in study.metrics.columns:
            continue
        mine = done[done["workload"] == workload]
        lines: UpdateLines = {}
        for group in [g for g in dict.fromkeys(mine["group"]) if g in groups_shown]:
            runs = mine[mine["group"] == group]
            mean = _update_lines(study, runs, metric)
            if mean is not None:
                first = runs.iloc[0]
                lines[(int(first["workers"]), str(first["variant"]), str(first["engine"]))] = mean
        if lines:
            panels.append((str(workload), metric, lines))
    return panels


def _updates_block(owner: Any, metric: Metric, lines: UpdateLines, encoding: Encoding) -> None:
    """One workload's panels, one per K > 1 (one worker, in black, in each)."""
    colors, styles, markers = encoding
    counts = sorted({w for w, _, _ in lines if w > 1}) or [1]
    ncols = min(3, len(counts))
    axes = owner.subplots(math.ceil(len(counts) / ncols), ncols, squeeze=False, sharey=True).flat
    for ax, k in zip(axes, counts):
        low, high = math.inf, 0.0
        for (workers, variant, engine), mean in lines.items():
            if workers not in (1, k):
                continue
            alone = workers == 1
            low, high = min(low, mean["updates"].min()), max(high, mean["updates"].max())
            ax.plot(
                mean["updates"],
                mean[metric.name] * metric.scale,
                color="black" if alone else colors[variant],
                linestyle="-" if alone else styles[engine],
                marker=None if alone else markers[variant],
                markevery=max(1, len(mean) // 8),
                markersize=3.5,
                linewidth=1.8 if alone else 1.3,
                zorder=3 if alone else 2,
            )
        ax.set_xscale("log")
        graphics.log_ticks(ax.xaxis, 10, "plain", math.log10(high / low) if high > low else 0.0)
        ax.set_title(f"K = {k}", fontsize="medium")
        ax.set_xlabel("updates (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes)[len(counts) :]:
        ax.set_visible(False)
    axes[0].set_ylabel(metric.heading)


def _updates_legend(
    keys: list[tuple[int, str, str]],
    variants: list[str],
    engines: list[str],
    encoding: Encoding,
) -> tuple[list[Any], list[str], str]:
    """Handles, labels and title: one worker in black, colours by variant, line styles by
    engine (when several)."""
    from matplotlib.lines import Line2D

    colors, styles, markers = encoding
    handles: list[Any] = [Line2D([], [], color="black", linewidth=1.8)]
    labels = [" / ".join(sorted({v for w, v, _ in keys if w == 1}, key=natural_key)) + ", K = 1"]
    if not any(w == 1 for w, _, _ in keys):
        handles, labels = [], []
    handles += [
        Line2D([], [], color=colors[v], marker=markers[v], markersize=3.5, linewidth=1.3) for v in variants
    ]
    labels += variants
    if len(engines) > 1:
        handles += [
            Line2D([], [], color=graphics.CONTEXT_DARK, linestyle=styles[e], linewidth=1.3) for e in engines
        ]
        labels += engines
    heading = "variant (colour)" + (
        ", engine (line style)" if len(engines) > 1 else f"; engine {engines[0]}" if engines else ""
    )
    return handles, labels, heading


def updates_plot(study: Study, groups_shown: list[str]) -> MplFigure | None:
    """The primary metric against updates of the evaluated model (mean over seeds at each
    evaluation), a block per workload, updates on a log axis; one panel per worker count K
    (one worker drawn in every panel, in black, as the reference), colour and marker by
    variant, line style by engine; None when nothing to draw."""
    panels = _update_panels(study, groups_shown)
    if not panels:
        return None
    keys = [k for _, _, lines in panels for k in lines]
    variants = sorted(dict.fromkeys(v for w, v, _ in keys if w > 1), key=natural_key)
    engines = sorted(dict.fromkeys(e for w, _, e in keys if w > 1), key=natural_key)
    encoding = _encoding(variants, engines)
    entries = len(variants) + (len(engines) if len(engines) > 1 else 0) + 1
    sizes = []
    for _, _, lines in panels:
        counts = sorted({w for w, _, _ in lines if w > 1}) or [1]
        sizes.append(graphics.grid_size(len(counts), entries))
    title = "Primary metric against updates of the evaluated model (mean over seeds)"
    fig, owners = graphics.stack(sizes, [p[0] for p in panels], len(panels) > 1, title)
    for owner, (_, metric, lines) in zip(owners, panels):
        _updates_block(owner, metric, lines, encoding)
    handles, labels, heading = _updates_legend(keys, variants, engines, encoding)
    graphics.legend(owners[-1] if len(owners) > 1 else owners[0], handles, labels, heading)
    return fig
