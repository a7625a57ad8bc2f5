"""With ``--cluster``: "Estimated on cluster NAME": how the cost model estimates compute and
communication on that cluster, its Pareto front and speedup, a table of estimated times and
time to target, and the primary metric against estimated time; workbook sheet ``cluster``."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from localsgd.costmodel import GBIT
from localsgd.report import curve_plots, plots, workbook
from localsgd.report.columns import comm, key_columns, metric_columns, speedup
from localsgd.report.estimates import ClusterEstimates
from localsgd.report.render import Bullets, Heading, Table, frame_rows
from localsgd.report.rounding import fmt, fmt_pm
from localsgd.report.section import Context, Drawing, Parts, Shown
from localsgd.report.tables import natural_key


def parts(ctx: Context) -> Parts:
    estimates = ctx.estimates
    if estimates is None:
        return Parts()
    summary, look, metrics, frame = ctx.summary, ctx.look, ctx.metrics, ctx.curves
    name = estimates.cluster.name
    pareto = Drawing(
        "pareto_est_time",
        f"Pareto front: final primary metric against estimated training time on {name} "
        "(mean ± std over seeds on both axes)",
        lambda: plots.pareto_est_time(summary, look, metrics, name),
    )
    est_speedup = Drawing(
        "metric_vs_est_speedup",
        f"Final primary metric against estimated speedup over one worker on {name} "
        "(mean ± std over seeds on both axes)",
        lambda: plots.metric_vs_est_speedup(summary, look, metrics, name),
    )
    est_time = Drawing(
        "metric_vs_est_time",
        f"Primary metric against estimated training time on {name} (mean, band ± std over seeds)",
        lambda: curve_plots.metric_vs_est_time(frame, look, metrics, name),
    )
    return Parts(
        [
            Heading(2, f"Estimated on cluster {name}"),
            Bullets(_lines(estimates)),
            Shown(pareto),
            Shown(est_speedup),
            _table(ctx, estimates),
            Shown(est_time),
        ],
        {"cluster": workbook.Sheet(_sheet(estimates), "item")},
    )


def _table(ctx: Context, estimates: ClusterEstimates) -> Table:
    if ctx.summary.empty:
        return Table(["note"], [["no completed run: nothing to estimate"]])
    return frame_rows(
        ctx.summary,
        [
            *key_columns(ctx.study),
            ("seeds", lambda r: str(r.n_seeds)),
            *metric_columns(ctx.study, best=False, every=False),
            ("est. compute s", lambda r: fmt_pm(r.est_compute_seconds_mean, r.est_compute_seconds_std)),
            ("est. comm s", lambda r: comm(r, r.est_comm_seconds_mean, r.est_comm_seconds_std)),
            ("est. total s", lambda r: fmt_pm(r.est_total_seconds_mean, r.est_total_seconds_std)),
            ("est. speedup (×)", lambda r: speedup(r.est_speedup, r.est_speedup_std)),
            ("target", lambda r: _target_text(estimates, r.workload)),
            ("reached", lambda r: f"{r.est_target_reached}/{r.n_seeds}"),
            ("to target: compute s", lambda r: fmt(r.est_target_compute_seconds_mean)),
            ("to target: comm s", lambda r: comm(r, r.est_target_comm_seconds_mean, math.nan)),
            (
                "to target: total s",
                lambda r: fmt_pm(r.est_target_total_seconds_mean, r.est_target_total_seconds_std),
            ),
        ],
    )


def _target_text(estimates: ClusterEstimates, workload: str) -> str:
    target = estimates.targets.get(str(workload))
    if target is None or target.metric is None or not math.isfinite(target.value):
        return ""
    return f"{fmt(target.value, target.metric.scale)}{target.metric.unit}"


def _link_text(alpha: float, bandwidth: float) -> str:
    return f"α = {alpha * 1e6:.4g} µs, β = {bandwidth / GBIT:.4g} Gb/s ({bandwidth / 1e9:.4g} GB/s)"


def _lines(estimates: ClusterEstimates) -> list[str]:
    return [*_model_lines(estimates), *_compute_lines(estimates), *_target_lines(estimates)]


def _model_lines(estimates: ClusterEstimates) -> list[str]:
    """The cluster, its links and how a collective is costed on them."""
    cluster = estimates.cluster
    g = cluster.devices_per_node
    return [
        f"Cluster `{cluster.name}`" + (f": {cluster.description}." if cluster.description else "."),
        f"{g} device{'s' if g > 1 else ''} per node; K workers fill ceil(K/{g}) nodes in rank order. "
        + (
            f"Intra-node link: {_link_text(cluster.intra.alpha, cluster.intra.bandwidth)}. "
            if cluster.intra
            else ""
        )
        + f"Inter-node link: {_link_text(cluster.inter.alpha, cluster.inter.bandwidth)}.",
        "Communication: each collective of a run is costed as a ring all-reduce "
        "(2(p−1)·α + 2(p−1)/p · n/β; "
        + (
            "hierarchical across nodes of several devices"
            if cluster.allreduce == "hierarchical"
            else "one flat ring over all ranks across nodes, as gloo runs it"
        )
        + "), summed over the run's per-scope counters (collectives, payload bytes), plus a run's "
        "injected delay (comm.delay) per collective of its scope; see docs/costmodel.md.",
    ]


def _compute_lines(estimates: ClusterEstimates) -> list[str]:
    """Where a step's compute time comes from, and what the estimate adds up."""
    cluster = estimates.cluster
    if cluster.seconds_per_sample is not None:
        lines = [
            f"Compute per step: B × {cluster.seconds_per_sample:.4g} s per sample (the cluster's device)."
        ]
    else:
        lines = [
            "Compute per step: measured in each run on the machine that ran it, "
            "(wall time − communication time) / steps. Where K worker processes shared fewer cores "
            "than K this includes contention, so the estimate is pessimistic for large K; give the "
            "cluster a seconds_per_sample (cluster TOML) to cost compute on the target device."
        ]
        if (~estimates.study.runs["real_wall_time"].astype(bool)).any():
            lines.append(
                "Runs of an engine that computes all K workers in one process: a worker's "
                "compute per step is taken from the single-worker runs of the same workload and "
                "per-worker batch when the study has them, else the simulated step time divided by "
                "K (batched replicas cost less than K separate steps, so that leans optimistic)."
            )
    lines.append("Estimated time = compute + communication (no overlap assumed); evaluation excluded.")
    return lines


def _target_lines(estimates: ClusterEstimates) -> list[str]:
    lines = []
    for workload, target in sorted(estimates.targets.items(), key=lambda kv: natural_key(kv[0])):
        if target.metric is not None and math.isfinite(target.value):
            m = target.metric
            lines.append(
                f"Target for {workload}: {target.split} {m.title.removeprefix('test ')} "
                f"{'≥' if m.higher_is_better else '≤'} "
                f"{target.value * m.scale:.4g}{m.unit} ({target.how}); time to target = the estimate "
                "at the first evaluation reaching it, blank unless every seed did."
            )
        else:
            lines.append(f"Target for {workload}: none ({target.how}).")
    return lines


def _sheet(estimates: ClusterEstimates) -> pd.DataFrame:
    """The cluster's parameters and the targets, one (item, value) row each."""
    cluster = estimates.cluster
    rows: list[tuple[str, Any]] = [
        ("name", cluster.name),
        ("description", cluster.description),
        ("devices_per_node", cluster.devices_per_node),
        ("intra.alpha_seconds", cluster.intra.alpha if cluster.intra else None),
        ("intra.bandwidth_bytes_per_second", cluster.intra.bandwidth if cluster.intra else None),
        ("inter.alpha_seconds", cluster.inter.alpha),
        ("inter.bandwidth_bytes_per_second", cluster.inter.bandwidth),
        ("seconds_per_sample", cluster.seconds_per_sample),
        ("compute", "seconds_per_sample × B" if cluster.seconds_per_sample is not None else "measured"),
    ]
    for workload, target in estimates.targets.items():
        rows.append((f"target_metric[{workload}]", target.metric.name if target.metric else None))
        rows.append((f"target_value[{workload}]", target.value))
        rows.append((f"target_how[{workload}]", target.how))
    return pd.DataFrame(rows, columns=["item", "value"]).astype({"value": object})
