"""Wall-clock estimates of a study's runs on a named cluster (``localsgd.costmodel``).

Per run: the final estimate (compute, communication, total) from its final counters and
steps; per evaluation row: the estimate of the run up to that row; per run: the estimated
time to a target value of its workload's primary metric (the first evaluation row reaching
it, in the metric's direction). Per group: mean ± std over the completed seeds and the
estimated speedup over the K=1 baseline on the cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from localsgd.costmodel import Cluster, estimate_run
from localsgd.records import Metric
from localsgd.report.rounding import ratio_std
from localsgd.report.selection import Selection, selection
from localsgd.report.tables import VALIDATION, Study, _baseline_keys, row_counters

TARGET_MARGIN = 0.05
"""Default target: the best mean final value of the workload's primary metric, short of it
by this fraction of its size (0.95 × the best accuracy; 1.05 × the lowest loss)."""

PARTS = ("compute", "comm", "total")
RUN_COLUMNS = [f"est_{p}_seconds" for p in PARTS]
TARGET_COLUMNS = [f"est_target_{p}_seconds" for p in PARTS]


@dataclass
class Target:
    """The value of a workload's primary metric its time-to-target is measured at."""

    metric: Metric | None
    value: float
    how: str
    split: str = "validation"
    """The split whose values reach it (``validation`` or ``test``)."""

    def reached(self, value: float) -> bool:
        return self.metric is not None and math.isfinite(value) and self.metric.reached(value, self.value)

    def column(self) -> str | None:
        """The metrics frame's column the target is read from."""
        if self.metric is None:
            return None
        return f"{VALIDATION}{self.metric.name}" if self.split == "validation" else self.metric.name


@dataclass
class ClusterEstimates:
    cluster: Cluster
    study: Study
    """The study with estimate columns: ``runs`` gains ``est_*`` (final and to target),
    ``metrics`` gains ``est_{compute,comm,total}_seconds`` per evaluation row."""
    summary: pd.DataFrame
    """The summary table with the estimate columns (:func:`estimate`)."""
    targets: dict[str, Target]
    """Per workload."""


def parse_target(text: str | None) -> tuple[str | None, float] | None:
    """``"accuracy=0.9"`` -> ("accuracy", 0.9); a bare ``"0.9"`` is for the primary metric
    (None). ``ValueError`` naming ``--target`` for anything else."""
    if text is None:
        return None
    name, _, raw = text.rpartition("=") if "=" in text else (None, "", text)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"--target must be METRIC=VALUE or a number for the primary metric, got {text!r}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"--target must be a finite number, got {text!r}")
    if name is not None and not name.isidentifier():
        raise ValueError(f"--target metric name {name!r} is not a metric name")
    return name, value


def measured_compute_per_step(
    wall_seconds: float, comm_seconds: float, steps: float, workers: int, real_wall_time: bool = True
) -> float:
    """One worker's compute per step measured in a run: (wall − comm) / steps of its last
    row on the machine that ran it. An engine whose wall time is not a real K-worker time
    (one process computed all K replicas) has it divided by K. NaN when a number is
    missing (a K=1 run communicates nothing, so its missing comm is 0)."""
    if workers == 1 and not math.isfinite(comm_seconds):
        comm_seconds = 0.0
    if not (math.isfinite(wall_seconds) and math.isfinite(comm_seconds) and steps and steps > 0):
        return math.nan
    per_step = max(wall_seconds - comm_seconds, 0.0) / steps
    return per_step if real_wall_time else per_step / workers


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


DELAY_PREFIX = "config.comm.delay."
"""Flattened config columns of a run's injected delay per scope (``comm.delay``)."""


def injected_delay(run: dict[str, Any]) -> dict[str, float]:
    """A run's ``comm.delay`` (seconds per collective, by scope) from its flattened config."""
    return {
        key.removeprefix(DELAY_PREFIX): float(value)
        for key, value in run.items()
        if key.startswith(DELAY_PREFIX) and math.isfinite(_float(value))
    }


OVERLAP_COLUMN = "config.algorithm.overlap"
"""The flattened config column of a streamed run's τ (its world averages in flight τ steps)."""


def streamed_overlap(run: dict[str, Any]) -> dict[str, int]:
    """A run's overlap τ by scope (streaming averages the world scope), from its flattened
    config; empty where the run does not overlap."""
    tau = _float(run.get(OVERLAP_COLUMN))
    return {"world": int(tau)} if math.isfinite(tau) and tau > 0 else {}


CODEC_COLUMN = "config.algorithm.compression.codec"
"""The flattened config column of a compressed run's codec (whose work a cluster may price)."""


def compression_codec(run: dict[str, Any]) -> str | None:
    """A run's ``compression.codec`` from its flattened config; None where it sends values
    as they are."""
    codec = run.get(CODEC_COLUMN)
    return codec if isinstance(codec, str) and codec != "none" else None


def _estimate(
    counters: dict[str, dict[str, float]] | None,
    steps: float,
    workers: int,
    batch_size: int,
    cluster: Cluster,
    measured: float,
    delay: dict[str, float] | None = None,
    overlap: dict[str, int] | None = None,
    codec: str | None = None,
) -> tuple[float, float, float]:
    if counters is None or not math.isfinite(steps):
        return (math.nan, math.nan, math.nan)
    est = estimate_run(counters, steps, workers, batch_size, cluster, measured, delay, overlap, codec)
    return (est.compute_seconds, est.comm_seconds, est.total_seconds)


def targets_for(
    study: Study,
    summary: pd.DataFrame,
    workloads: list[str],
    target: tuple[str | None, float] | None,
    select: Selection | None = None,
) -> dict[str, Target]:
    """Per workload, the target its time-to-target is measured at, on the split ``select``
    names: ``target`` where given, else the best mean final value on that split, 5 % short."""
    select = select or selection(study)
    out = {}
    for workload in workloads:
        metric = study.primary(workload)
        if target is not None:
            name, value = target
            if name is not None and name != (metric.name if metric else None):
                names = [m.name for m in study.declared.get(workload, ())]
                raise ValueError(
                    f"--target {name}={value:g}: time to target uses the primary metric of "
                    f"{workload} ({metric.name if metric else 'none'}); its metrics are {names}"
                )
            out[workload] = Target(metric, value, "given (--target)", select.split(workload))
            continue
        column = f"{select.final_column(workload, metric)}_mean" if metric else None
        finals = [
            (float(r[column]), str(r["group"]))
            for r in summary[summary["workload"] == workload].to_dict("records")
            if column and math.isfinite(_float(r.get(column)))
        ]
        if metric is None or not finals:
            out[workload] = Target(metric, math.nan, "no completed run: no target", select.split(workload))
            continue
        best, group = max(finals, key=lambda f: f[0] if metric.higher_is_better else -f[0])
        sign = -1.0 if metric.higher_is_better else 1.0
        value = best + sign * TARGET_MARGIN * abs(best)
        shown = f"{best * metric.scale:.4g}{metric.unit}"
        factor = 1 + sign * TARGET_MARGIN
        split = select.split(workload)
        out[workload] = Target(
            metric,
            value,
            f"{factor:g} × the best mean final {split} {metric.title.removeprefix('test ')} ({shown}, {group})",
            split,
        )
    return out


Estimate = tuple[float, float, float]
"""Estimated (compute, communication, total) seconds."""


@dataclass(frozen=True)
class _RunInputs:
    """Per run: (K, B, workload), injected delay per scope, compute seconds per step,
    streaming's overlap τ per scope, the codec of a compressed run."""

    who: dict[str, tuple[int, int, str]]
    delays: dict[str, dict[str, float]]
    per_step: dict[str, float]
    overlap: dict[str, dict[str, int]] = field(default_factory=dict)
    codec: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def of(cls, runs: pd.DataFrame) -> _RunInputs:
        who: dict[str, tuple[int, int, str]] = {}
        delays: dict[str, dict[str, float]] = {}
        per_step: dict[str, float] = {}
        overlap: dict[str, dict[str, int]] = {}
        codec: dict[str, str | None] = {}
        for run in runs.to_dict("records"):
            rid, workers, batch = str(run["run_id"]), int(run["workers"]), int(run["batch_size"])
            who[rid] = (workers, batch, str(run["workload"]))
            delays[rid] = injected_delay(run)
            overlap[rid] = streamed_overlap(run)
            codec[rid] = compression_codec(run)
            per_step[rid] = measured_compute_per_step(
                float(run["wall_seconds"]),
                float(run["comm_seconds"]),
                float(run["final_step"]),
                workers,
                bool(run["real_wall_time"]),
            )
        # Where one process computed all K replicas, a worker's step is one replica's step: when
        # the study has single-worker runs of the same workload and batch, their measured step
        # time is the better figure (K batched replicas run faster per replica than one model).
        single: dict[tuple[str, int], list[float]] = {}
        for rid, (workers, batch, workload) in who.items():
            if workers == 1 and math.isfinite(per_step[rid]):
                single.setdefault((workload, batch), []).append(per_step[rid])
        for run in runs.to_dict("records"):
            rid = str(run["run_id"])
            workers, batch, workload = who[rid]
            if not run["real_wall_time"] and workers > 1 and (workload, batch) in single:
                times = single[(workload, batch)]
                per_step[rid] = sum(times) / len(times)
        return cls(who, delays, per_step, overlap, codec)


def _run_estimate(study: Study, rid: str, runs: _RunInputs, cluster: Cluster) -> Estimate:
    """The whole run, from its final counters."""
    workers, batch, _ = runs.who[rid]
    counters = study.final_counters.get(rid, {})
    steps = float(counters.get("steps", math.nan))
    return _estimate(
        counters.get("by_scope"),
        steps,
        workers,
        batch,
        cluster,
        runs.per_step[rid],
        runs.delays[rid],
        runs.overlap.get(rid),
        runs.codec.get(rid),
    )


def _row_estimates(
    metrics: pd.DataFrame, runs: _RunInputs, cluster: Cluster, targets: dict[str, Target]
) -> tuple[list[Estimate], dict[str, tuple[float, Estimate]]]:
    """Per evaluation row: the run up to that row; and each run's first row at or past its
    workload's target (its step and estimate)."""
    rows_est: list[Estimate] = []
    reached: dict[str, tuple[float, Estimate]] = {}
    for record in metrics.to_dict("records"):
        row = {str(k): v for k, v in record.items()}
        rid = str(row["run_id"])
        if rid not in runs.who:
            rows_est.append((math.nan, math.nan, math.nan))
            continue
        workers, batch, workload = runs.who[rid]
        step = _float(row.get("step"))
        est = _estimate(
            row_counters(row),
            step,
            workers,
            batch,
            cluster,
            runs.per_step[rid],
            runs.delays[rid],
            runs.overlap.get(rid),
            runs.codec.get(rid),
        )
        rows_est.append(est)
        goal = targets[workload]
        target_column = goal.column()
        value = _float(row.get(target_column)) if target_column else math.nan
        if goal.reached(value) and (rid not in reached or step < reached[rid][0]):
            reached[rid] = (step, est)
    return rows_est, reached


def estimate(
    study: Study,
    summary: pd.DataFrame,
    cluster: Cluster,
    target: tuple[str | None, float] | None = None,
    select: Selection | None = None,
) -> ClusterEstimates:
    """Add the cluster estimates to ``study`` and ``summary``.

    Summary columns added: ``est_{compute,comm,total}_seconds_{mean,std}``, ``est_speedup``
    (mean estimated total of the completed K=1 runs of the same workload and setting /
    this group's) and ``est_speedup_std`` (both spreads propagated, as for the measured
    speedup), ``target_value``, ``est_target_{compute,comm,total}_seconds_mean``
    and ``est_target_total_seconds_std`` (NaN unless every completed seed reached the
    target), ``est_target_reached`` (seeds that reached it).
    """
    runs = study.runs.copy()
    metrics = study.metrics.copy()
    workloads = sorted({str(w) for w in runs["workload"]})
    targets = targets_for(study, summary, workloads, target, select)
    runs_in = _RunInputs.of(runs)
    final = {rid: _run_estimate(study, rid, runs_in, cluster) for rid in runs_in.who}
    ids = [str(r) for r in runs["run_id"]]
    runs["est_compute_per_step"] = [
        cluster.seconds_per_sample * runs_in.who[r][1]
        if cluster.seconds_per_sample is not None
        else runs_in.per_step[r]
        for r in ids
    ]
    for i, column in enumerate(RUN_COLUMNS):
        runs[column] = [final[r][i] for r in ids]
    rows_est, reached = _row_estimates(metrics, runs_in, cluster, targets)
    for i, column in enumerate(RUN_COLUMNS):
        metrics[column] = [e[i] for e in rows_est] if rows_est else pd.Series(dtype=float)
    runs["target_value"] = [targets[runs_in.who[r][2]].value for r in ids]
    runs["est_target_step"] = [reached[r][0] if r in reached else math.nan for r in ids]
    for i, column in enumerate(TARGET_COLUMNS):
        runs[column] = [reached[r][1][i] if r in reached else math.nan for r in ids]

    new_study = replace(study, runs=runs, metrics=metrics)
    return ClusterEstimates(cluster, new_study, _summary(new_study, summary, targets), targets)


def _summary(study: Study, summary: pd.DataFrame, targets: dict[str, Target]) -> pd.DataFrame:
    done = study.runs[study.runs["status"] == "completed"]
    columns = [f"est_{p}_seconds_{s}" for p in PARTS for s in ("mean", "std")]
    columns += ["est_speedup", "est_speedup_std", "target_value"]
    columns += [f"{c}_mean" for c in TARGET_COLUMNS] + ["est_target_total_seconds_std", "est_target_reached"]
    if summary.empty:
        return summary.assign(**{c: pd.Series(dtype=float) for c in columns})
    base_keys = _baseline_keys(study)
    singles = done[done["workers"] == 1].groupby(base_keys, sort=False, dropna=False)
    base = singles["est_total_seconds"].mean()
    base_std = singles["est_total_seconds"].std(ddof=1)
    base_ids = singles["run_id"].agg(frozenset)
    rows: list[dict[str, Any]] = []
    for (workload, group), part in done.groupby(["workload", "group"], sort=False):
        row: dict[str, Any] = {"workload": workload, "group": group}
        for p in PARTS:
            row[f"est_{p}_seconds_mean"] = part[f"est_{p}_seconds"].mean()
            row[f"est_{p}_seconds_std"] = part[f"est_{p}_seconds"].std(ddof=1)
        key = tuple(part[k].iloc[0] for k in base_keys)
        key = key if len(key) > 1 else key[0]
        if key not in base.index:
            row["est_speedup"] = row["est_speedup_std"] = math.nan
        elif base_ids[key] == frozenset(part["run_id"]):  # the baseline itself: 1 by definition
            row["est_speedup"], row["est_speedup_std"] = 1.0, 0.0
        else:
            total, total_std = row["est_total_seconds_mean"], row["est_total_seconds_std"]
            row["est_speedup"] = base[key] / total
            row["est_speedup_std"] = ratio_std(base[key], base_std[key], total, total_std)
        row["target_value"] = targets[str(workload)].value
        for column in TARGET_COLUMNS:
            # Strict: a group whose seeds did not all reach the target has no mean time.
            row[f"{column}_mean"] = part[column].mean(skipna=False)
        row["est_target_total_seconds_std"] = part["est_target_total_seconds"].std(ddof=1, skipna=False)
        row["est_target_reached"] = int(part["est_target_total_seconds"].notna().sum())
        rows.append(row)
    extra = pd.DataFrame(rows, columns=["workload", "group", *columns])
    return summary.merge(extra, on=["workload", "group"], how="left")
