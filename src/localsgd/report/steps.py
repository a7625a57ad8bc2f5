"""Steps-to-result (Shallue et al. 2019): per batch size, the fewest training steps any trial
of its metaparameter search needed to reach a target on the validation split.

A *trial* is one point of the search: runs that differ only in their seed are the same
trial (seeds are replicates, never trials). The trials of one *cell* differ only in their
searched metaparameters (the keys of the study's ``[grid.search]``, which the plan records
per run, and always ``optimizer.lr``) and in their step budget. A cell is (workload,
algorithm variant, K, B, and every other config key that varies in the workload's runs).
As in google-research ``batch_science`` (``measurement_utils``):

- a run reaches the target at the first evaluated step whose metric, on the split the
  report selects on (:mod:`~localsgd.report.selection`: validation unless told otherwise),
  strictly crosses it (``>`` for a metric where higher is better, ``<`` otherwise;
  :meth:`Metric.crossed`); a diverged run counts up to its last evaluation;
- a trial reaches it when every one of its seeds does; its steps are the mean over its
  seeds, with their standard deviation;
- a cell's steps-to-result is the smallest mean over its trials, the best trial the one
  that has it, and the cell has none when no trial reached the target. The best trial's
  test metric (at the crossing and at the end) is reported beside it.

A *curve* is a cell's key without K and B: its steps-to-result against the global batch
K·B. Regimes along a curve (:func:`regimes`): the local slope of log steps against log K·B
between neighbouring batch sizes; ≤ ``PERFECT`` is perfect scaling (the ideal is −1),
≥ ``MAXIMAL`` maximal data parallelism (flat), in between diminishing returns. These
thresholds are this project's heuristic for naming the regimes, not Shallue et al.'s
(who describe the regimes from the curves' shapes).
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
from localsgd.report.selection import Selection, selection
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
    "split",
    "trials",
    "seeds",
    "reached",
    "steps",
    "steps_std",
    "epochs",
    "rounds",
    "test_at_result",
    "final_test",
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


def first_crossing(metrics: pd.DataFrame, column: str, metric: Metric, target: float) -> dict[str, Any] | None:
    """A run's first evaluation row (sorted by step) whose ``column`` (``metric`` on one
    split) strictly crosses ``target``."""
    if column not in metrics.columns:
        return None
    for row in metrics.sort_values("step").to_dict("records"):
        value = row.get(column)
        if value is not None and math.isfinite(float(value)) and metric.crossed(float(value), target):
            return row
    return None


@dataclass(frozen=True)
class Trial:
    """One trial of a cell that reached the target on every seed: the means over its seeds."""

    steps: float
    steps_std: float
    epochs: float
    rounds: float
    test_at_result: float
    final_test: float
    seeds: int
    run: dict[str, Any]
    """A run of the trial (its config is the trial's)."""


def _trial_key(run: Mapping[str, Any]) -> str:
    """The run's config without its seed and name: the same for every seed of one trial."""
    config = {k: v for k, v in run.items() if k.startswith("config.") and k not in ("config.seed", "config.name")}
    return json.dumps(config, sort_keys=True, default=str)


def _trial(runs: list[dict[str, Any]], by_run: Mapping[str, pd.DataFrame], goal: Goal, column: str) -> Trial | None:
    """The trial of ``runs`` (its seeds), or None unless every seed crossed the target."""
    hits = []
    for run in runs:
        rows = by_run.get(run["run_id"])
        hit = first_crossing(rows, column, goal.metric, goal.value) if rows is not None else None
        if hit is None:
            return None
        hits.append(hit)
    steps = [float(h["step"]) for h in hits]
    syncs = [float(h["syncs"]) if h.get("syncs") is not None else math.nan for h in hits]
    return Trial(
        steps=_mean(steps),
        steps_std=_std(steps),
        epochs=_mean([float(h.get("epoch", math.nan)) for h in hits]),
        rounds=_mean(syncs),
        test_at_result=_mean([_number(h.get(goal.metric.name)) for h in hits]),
        final_test=_mean([_number(r.get(f"final_{goal.metric.name}")) for r in runs]),
        seeds=len(runs),
        run=runs[0],
    )


def steps_table(study: Study, targets: Mapping[str, Goal], select: Selection | None = None) -> pd.DataFrame:
    """One row per cell of a workload with a target (columns :data:`COLUMNS`), sorted by
    workload, curve and K·B; each curve's rows carry the local slope and regime. Runs cross
    the target on the split ``select`` names per workload (default: validation where the runs hold it)."""
    select = select or selection(study)
    runs = study.runs[study.runs["status"].isin(["completed", "diverged"])]
    runs = runs[runs["workload"].astype(str).isin(list(targets))]
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    searched = _searched(study)
    by_run = dict(tuple(study.metrics.groupby("run_id"))) if not study.metrics.empty else {}
    out = []
    for workload, part in runs.groupby("workload", sort=False):
        goal = targets[str(workload)]
        column = select.column(str(workload), goal.metric)
        part = part.assign(cell=_cells(part, searched))
        keys = ["variant", "algorithm", "workers", "batch_size", "cell"]
        for key, cell in part.groupby(keys, sort=False, dropna=False):
            variant, algorithm, workers, batch, setting = key
            trials: dict[str, list[dict[str, Any]]] = {}
            for run in cell.to_dict("records"):
                trials.setdefault(_trial_key(run), []).append(run)
            reached = [t for t in (_trial(seeds, by_run, goal, column) for seeds in trials.values()) if t]
            best = min(reached, key=lambda t: t.steps) if reached else None
            row: dict[str, Any] = {
                "workload": workload,
                "curve": variant + (f" [{setting}]" if setting else ""),
                "variant": variant,
                "algorithm": algorithm,
                "period": cell["period"].iloc[0],
                "workers": int(workers),
                "batch_size": int(batch),
                "global_batch": int(workers) * int(batch),
                "setting": setting,
                "metric": goal.metric.name,
                "target": goal.value,
                "split": select.split(str(workload)),
                "trials": len(trials),
                "seeds": max(len(seeds) for seeds in trials.values()),
                "reached": len(reached),
                "steps": math.nan,
                "steps_std": math.nan,
                "epochs": math.nan,
                "rounds": math.nan,
                "test_at_result": math.nan,
                "final_test": math.nan,
                "best_run_id": None,
                "best_lr": math.nan,
                "best_momentum": math.nan,
                "best_metaparameters": "",
            }
            if best is not None:
                run = best.run
                drawn = sorted(searched.get(str(run["run_id"]), set()) | {"optimizer.lr"})
                row.update(
                    steps=best.steps,
                    steps_std=best.steps_std,
                    epochs=best.epochs,
                    rounds=best.rounds if int(workers) > 1 else math.nan,
                    test_at_result=best.test_at_result,
                    final_test=best.final_test,
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


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _std(values: Sequence[float]) -> float:
    """The sample standard deviation (ddof 1; NaN for one value)."""
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


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
