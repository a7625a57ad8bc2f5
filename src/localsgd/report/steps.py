"""Steps-to-result (Shallue et al. 2019): per batch size, the fewest training steps any trial
of its metaparameter search needed to reach a target.

A *trial* is a run; the trials of one *cell* differ only in their searched metaparameters
(the keys of the study's ``[grid.search]``, which the plan records per run, and always
``optimizer.lr``), in their seed and in their step budget. A cell is (workload, algorithm
variant, K, B, and every other config key that varies in the workload's runs). As in
google-research ``batch_science`` (``measurement_utils``):

- a trial reaches the target at the first evaluated step whose metric strictly crosses it
  (``>`` for a metric where higher is better, ``<`` otherwise; :meth:`Metric.crossed`);
- a cell's steps-to-result is the minimum over its trials (completed or diverged; a
  diverged trial counts up to its last evaluation), the best trial the one that reached it
  first, and the cell has none when no trial reached the target.

A *curve* is a cell's key without K and B: its steps-to-result against the global batch
K·B. Regimes along a curve (:func:`regimes`): the local slope of log steps against log K·B
between neighbouring batch sizes; ≤ ``PERFECT`` is perfect scaling (the ideal is −1),
≥ ``MAXIMAL`` maximal data parallelism (flat), in between diminishing returns.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from localsgd.records import Metric
from localsgd.report.estimates import parse_target
from localsgd.report.tables import Study, natural_key

PERFECT = -0.8
"""A local slope at or below this is perfect scaling (steps fall as fast as the batch grows)."""
MAXIMAL = -0.2
"""A local slope at or above this is maximal data parallelism (a larger batch saves no step)."""
REGIMES = ("perfect scaling", "diminishing returns", "maximal data parallelism")

# Config keys that are a trial's budget, identity or the cell's own key, never part of a cell.
_NOT_CELL = ("name", "seed", "workers", "data.batch_size", "workload.name", "engine", "fixed", "optimizer.lr")
_BUDGET = ("train.epochs", "train.max_steps", "train.stop_at", "train.eval_every")

COLUMNS = [
    "workload",
    "curve",
    "variant",
    "algorithm",
    "period",
    "workers",
    "batch_size",
    "global_batch",
    "setting",
    "metric",
    "target",
    "trials",
    "reached",
    "steps",
    "epochs",
    "rounds",
    "best_run_id",
    "best_lr",
    "best_momentum",
    "best_metaparameters",
    "slope",
    "regime",
]


@dataclass(frozen=True)
class Goal:
    """The result a workload's steps are counted to: a value of one of its metrics."""

    metric: Metric
    value: float
    how: str


def goals(study: Study, given: str | None) -> dict[str, Goal]:
    """Per workload, its target: ``given`` (``--target``: ``METRIC=VALUE`` or a value of
    the primary metric) for every workload, else the study's ``[study] target`` table.
    ``ValueError`` naming ``--target`` (or ``study.target``) for a metric a workload does not
    declare. Workloads without a target are left out."""
    out: dict[str, Goal] = {}
    table = study.plan.get("target") if given is None else None
    for workload in sorted(study.declared, key=natural_key):
        if given is not None:
            text, where = given, "--target"
        elif isinstance(table, Mapping) and isinstance(table.get(workload), str):
            text, where = str(table[workload]), f"study.target.{workload}"
        else:
            continue
        try:
            parsed = parse_target(text)
        except ValueError as exc:
            raise ValueError(str(exc).replace("--target", where, 1)) from None
        assert parsed is not None
        name, value = parsed
        declared = study.declared[workload]
        metric = (
            study.primary(workload) if name is None else next((m for m in declared if m.name == name), None)
        )
        if metric is None:
            raise ValueError(f"{where} = {text!r}: {workload} has the metrics {[m.name for m in declared]}")
        out[workload] = Goal(metric, value, "--target" if given is not None else "the study's [study] target")
    return out


def _searched(study: Study) -> dict[str, set[str]]:
    """Per run id, the config keys its search drew (from the plan)."""
    out: dict[str, set[str]] = {}
    for run in study.plan.get("runs") or []:
        if isinstance(run, Mapping) and isinstance(run.get("search"), Mapping):
            keys = run["search"].get("keys")
            if isinstance(keys, list):
                out[str(run.get("run_id"))] = {str(k) for k in keys}
    return out


def _cells(runs: pd.DataFrame, searched: Mapping[str, set[str]]) -> list[str]:
    """Per run (in order), the text of the config keys that set its cell apart."""
    config = [c for c in runs.columns if c.startswith("config.")]
    varying = []
    for column in config:
        key = column.removeprefix("config.")
        if key.startswith("algorithm.") or key in _NOT_CELL or key in _BUDGET:
            continue
        if runs[column].map(lambda v: json.dumps(v, sort_keys=True, default=str)).nunique() > 1:
            varying.append(key)
    out = []
    for row in runs.to_dict("records"):
        drawn = searched.get(str(row["run_id"]), set())
        parts = [f"{k}={_show(row.get('config.' + k))}" for k in varying if k not in drawn]
        # A searched key names the curve too: "momentum searched" against "momentum=0".
        parts += [f"{k.rsplit('.', 1)[-1]} searched" for k in sorted(drawn - {"optimizer.lr"})]
        out.append(", ".join(parts))
    return out


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def first_crossing(metrics: pd.DataFrame, metric: Metric, target: float) -> dict[str, Any] | None:
    """A run's first evaluation row (sorted by step) whose metric strictly crosses ``target``."""
    if metric.name not in metrics.columns:
        return None
    for row in metrics.sort_values("step").to_dict("records"):
        value = row.get(metric.name)
        if value is not None and math.isfinite(float(value)) and metric.crossed(float(value), target):
            return row
    return None


def steps_table(study: Study, targets: Mapping[str, Goal]) -> pd.DataFrame:
    """One row per cell of a workload with a target (columns :data:`COLUMNS`), sorted by
    workload, curve and K·B; each curve's rows carry the local slope and regime."""
    runs = study.runs[study.runs["status"].isin(["completed", "diverged"])]
    runs = runs[runs["workload"].astype(str).isin(list(targets))]
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    searched = _searched(study)
    by_run = dict(tuple(study.metrics.groupby("run_id"))) if not study.metrics.empty else {}
    out = []
    for workload, part in runs.groupby("workload", sort=False):
        goal = targets[str(workload)]
        part = part.assign(cell=_cells(part, searched))
        keys = ["variant", "algorithm", "workers", "batch_size", "cell"]
        for key, cell in part.groupby(keys, sort=False, dropna=False):
            variant, algorithm, workers, batch, setting = key
            best: tuple[float, dict[str, Any], dict[str, Any]] | None = None
            reached = 0
            for run in cell.to_dict("records"):
                rows = by_run.get(run["run_id"])
                hit = first_crossing(rows, goal.metric, goal.value) if rows is not None else None
                if hit is None:
                    continue
                reached += 1
                if best is None or float(hit["step"]) < best[0]:
                    best = (float(hit["step"]), hit, run)
            period = cell["period"].iloc[0]
            row: dict[str, Any] = {
                "workload": workload,
                "curve": variant + (f" [{setting}]" if setting else ""),
                "variant": variant,
                "algorithm": algorithm,
                "period": period,
                "workers": int(workers),
                "batch_size": int(batch),
                "global_batch": int(workers) * int(batch),
                "setting": setting,
                "metric": goal.metric.name,
                "target": goal.value,
                "trials": len(cell),
                "reached": reached,
                "steps": math.nan,
                "epochs": math.nan,
                "rounds": math.nan,
                "best_run_id": None,
                "best_lr": math.nan,
                "best_momentum": math.nan,
                "best_metaparameters": "",
            }
            if best is not None:
                step, hit, run = best
                drawn = sorted(searched.get(str(run["run_id"]), set()) | {"optimizer.lr"})
                row.update(
                    steps=step,
                    epochs=float(hit.get("epoch", math.nan)),
                    rounds=float(hit["syncs"])
                    if int(workers) > 1 and hit.get("syncs") is not None
                    else math.nan,
                    best_run_id=run["run_id"],
                    best_lr=float(run.get("config.optimizer.lr", math.nan)),
                    best_momentum=float(run.get("config.optimizer.momentum", math.nan)),
                    best_metaparameters=", ".join(f"{k}={_show(run.get('config.' + k))}" for k in drawn),
                )
            out.append(row)
    out.sort(key=lambda r: (natural_key(str(r["workload"])), natural_key(r["curve"]), r["global_batch"]))
    table = pd.DataFrame(out, columns=[c for c in COLUMNS if c not in ("slope", "regime")])
    table["slope"], table["regime"] = math.nan, ""
    for _, curve in table.groupby(["workload", "curve"], sort=False):
        slopes, marks = regimes(list(curve["global_batch"]), list(curve["steps"]))
        table.loc[curve.index, "slope"] = slopes
        table.loc[curve.index, "regime"] = marks
    return table[COLUMNS]


def regimes(batches: Sequence[float], steps: Sequence[float]) -> tuple[list[float], list[str]]:
    """Per point of a curve (sorted by batch): the local slope d log steps / d log batch of
    the segment that ends at it (the first point: of the segment that starts at it), and
    its regime by :data:`PERFECT` and :data:`MAXIMAL`. Points without steps (no trial
    reached the target) and lone points get NaN and no regime."""
    n = len(batches)
    ok = [i for i in range(n) if math.isfinite(steps[i]) and steps[i] > 0]
    slope = [math.nan] * n
    for a, b in itertools.pairwise(ok):
        slope[b] = math.log(steps[b] / steps[a]) / math.log(batches[b] / batches[a])
    if len(ok) > 1:
        slope[ok[0]] = slope[ok[1]]
    return slope, [regime(s) for s in slope]


def regime(slope: float) -> str:
    if not math.isfinite(slope):
        return ""
    if slope <= PERFECT:
        return REGIMES[0]
    return REGIMES[2] if slope >= MAXIMAL else REGIMES[1]
