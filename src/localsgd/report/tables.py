"""From a store to pandas tables: one row per run, then mean ± std over seeds per group.

A *group* is one point of a study's grid: (workload, variant, K workers, per-worker batch B,
lr), plus any other config key that varies across the study (``setting``). Only completed
runs enter the means; failed and diverged runs are counted in the status table.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from localsgd.report.labels import algorithm_spec, period, variant_label
from localsgd.studies.store import RunRecord, Store

log = logging.getLogger(__name__)

GROUP_KEYS = ["workload", "variant", "workers", "batch_size", "lr"]

# Config keys that are the group key, the seed, or only a label: never part of ``setting``.
_NOT_SETTINGS = ("name", "seed", "workload", "workers", "data.batch_size", "optimizer.lr")

# Per-run quantities averaged over seeds (mean and std, ddof=1) in the summary table.
MEAN_STD = [
    "final_test_accuracy",
    "best_test_accuracy",
    "final_train_loss",
    "wall_seconds",
    "samples_per_second",
]
MEAN_ONLY = ["bytes", "syncs"]


@dataclass
class Study:
    """Everything the report shows, read from one store."""

    root: Path
    runs: pd.DataFrame
    """One row per finished run: identity, group key, final metrics, flattened config."""
    metrics: pd.DataFrame
    """Every evaluation row of every run, with ``run_id``."""
    group_keys: list[str]
    """``GROUP_KEYS``, plus ``setting`` when some other config key varies."""
    plan: dict[str, Any]
    """The study's ``plan.json`` (name, description, planned runs), ``{}`` without one
    (a store written by ``localsgd train``)."""
    final_counters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per run id, the communicator's final counters: ``{"steps": s, "by_scope": {scope:
    {"collectives", "bytes", "seconds"}}}`` (see :func:`final_counters`)."""


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON text (one spreadsheet cell)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{dotted}."))
        elif isinstance(value, (list, tuple)):
            out[dotted] = json.dumps(list(value))
        else:
            out[dotted] = value
    return out


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort ``H=4`` before ``H=16``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _number(value: Any) -> float:
    """A float for a JSON value: None and non-numbers become NaN (inf stays inf)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def _run_row(record: RunRecord, rows: list[dict[str, Any]]) -> dict[str, Any]:
    config = record.config
    info = record.status_info
    stats = info.get("stats")
    final_stats: Mapping[str, Any] = stats if isinstance(stats, dict) else {}
    last: Mapping[str, Any] = rows[-1] if rows else (info.get("final") or {})
    accs = [_number(r.get("test_accuracy")) for r in rows]
    accs = [a for a in accs if math.isfinite(a)]
    best = max(accs) if accs else _number(info.get("best_test_accuracy"))
    wall = _number(last.get("wall_seconds", info.get("wall_seconds")))
    samples = _number(last.get("samples", info.get("samples")))
    spec = algorithm_spec(config)
    return {
        "run_id": record.run_id,
        "name": record.name,
        "status": record.status,
        "error": record.error or info.get("error"),
        "workload": str(config.get("workload", "?")),
        "variant": variant_label(config),
        "algorithm": spec["name"],
        "workers": int(config.get("workers", 1)),
        "batch_size": int((config.get("data") or {}).get("batch_size", 0)),
        "lr": _number((config.get("optimizer") or {}).get("lr")),
        "seed": config.get("seed"),
        "period": period(config),
        "evaluations": len(rows),
        "final_step": _number(last.get("step", info.get("steps"))),
        "final_epoch": _number(last.get("epoch", info.get("epochs"))),
        "final_samples": samples,
        "final_test_accuracy": _number(last.get("test_accuracy")),
        "best_test_accuracy": best,
        "final_train_loss": _number(last.get("train_loss")),
        "final_test_loss": _number(last.get("test_loss")),
        "wall_seconds": wall,
        "samples_per_second": samples / wall if wall and wall > 0 else math.nan,
        # Communication totals: the run's final counters (they include the averaging on
        # exit, as the cost-model estimates do), else the last evaluation's.
        **{
            key: _number(final_stats.get(key, last.get(key)))
            for key in ("bytes", "syncs", "collectives", "comm_seconds")
        },
    }


def row_counters(row: Mapping[str, Any]) -> dict[str, dict[str, float]] | None:
    """The cumulative per-scope counters of a metrics row (or status ``stats``): its
    ``by_scope``, or, for rows written before scopes were recorded, its totals counted as
    world scope. None when the row has neither."""
    by_scope = row.get("by_scope")
    if isinstance(by_scope, Mapping) and by_scope:
        out = {
            str(scope): {k: _number(v.get(k, 0)) for k in ("collectives", "bytes", "seconds")}
            for scope, v in by_scope.items()
            if isinstance(v, Mapping)
        }
        return (
            out
            if all(math.isfinite(c["collectives"]) and math.isfinite(c["bytes"]) for c in out.values())
            else None
        )
    collectives, nbytes = _number(row.get("collectives")), _number(row.get("bytes"))
    if not (math.isfinite(collectives) and math.isfinite(nbytes)):
        return None
    return {
        "world": {"collectives": collectives, "bytes": nbytes, "seconds": _number(row.get("comm_seconds"))}
    }


def final_counters(record: RunRecord, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's final counters: ``status.json``'s ``stats`` when it has them (they include
    the closing average of ``DataParallel.__exit__``, which delivers the final model),
    else the last evaluation row's. ``{"steps": s, "by_scope": {...} or None}``."""
    info = record.status_info
    stats = info.get("stats")
    last: Mapping[str, Any] = rows[-1] if rows else (info.get("final") or {})
    steps = _number(last.get("step", info.get("steps")))  # training-loop steps of B samples each
    if isinstance(stats, Mapping):
        counted = row_counters(stats)
        if counted is not None:
            return {"steps": steps, "by_scope": counted}
    return {"steps": steps, "by_scope": row_counters(last)}


def load(store_dir: str | Path) -> Study:
    """Read a store's finished runs. ``ValueError`` if it is not a store or holds none."""
    store = Store(store_dir, create=False)
    records = store.records()
    if not records:
        raise ValueError(
            f"store {str(store.root)!r} has no finished runs (completed, failed or diverged): "
            "nothing to report"
        )
    run_rows, metric_rows, configs = [], [], []
    counters: dict[str, dict[str, Any]] = {}
    for record in records:
        rows = record.metrics()
        run_rows.append(_run_row(record, rows))
        counters[record.run_id] = final_counters(record, rows)
        metric_rows += [{"run_id": record.run_id, **row} for row in rows]
        configs.append(flatten(record.config))
    # Config keys that differ between runs but are not in the group key would otherwise
    # silently merge different experiments into one mean.
    keys = sorted({k for c in configs for k in c})
    varying = [
        k
        for k in keys
        if not k.startswith("algorithm.")
        and k not in _NOT_SETTINGS
        and len({json.dumps(c.get(k, "<unset>"), sort_keys=True, default=str) for c in configs}) > 1
    ]
    for row, config in zip(run_rows, configs):
        row["setting"] = ", ".join(f"{k}={config.get(k)}" for k in varying)
    group_keys = [*GROUP_KEYS, "setting"] if varying else list(GROUP_KEYS)
    order = sorted(range(len(run_rows)), key=lambda i: _sort_key(run_rows[i]))
    run_rows = [run_rows[i] for i in order]
    configs = [configs[i] for i in order]
    runs = pd.DataFrame(run_rows)
    runs["group"] = _group_labels(run_rows, group_keys)
    config_frame = pd.DataFrame([{f"config.{k}": v for k, v in c.items()} for c in configs])
    runs = pd.concat([runs, config_frame], axis=1)
    metrics = pd.DataFrame(metric_rows)
    if metrics.empty:
        metrics = pd.DataFrame(columns=["run_id", "step", "epoch", "wall_seconds"])
    return Study(Path(store.root), runs, metrics, group_keys, _plan(store.root), counters)


def _plan(root: Path) -> dict[str, Any]:
    path = root / "plan.json"
    if not path.exists():
        return {}
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    return plan if isinstance(plan, dict) else {}


def _sort_key(run: Mapping[str, Any]) -> tuple[Any, ...]:
    """Workload, then K (the baseline first), then variant, B, lr, setting, seed."""

    def num(value: Any) -> float:
        value = _number(value)
        return math.inf if math.isnan(value) else value

    return (
        natural_key(str(run["workload"])),
        run["workers"],
        natural_key(str(run["variant"])),
        run["batch_size"],
        num(run["lr"]),
        natural_key(str(run["setting"])),
        num(run["seed"]),
    )


def _group_labels(runs: list[dict[str, Any]], group_keys: list[str]) -> list[str]:
    """Legend text per run: variant and K, plus B, lr, setting where they vary in the study.
    Unique within a workload (each workload has its own panel), not across workloads."""

    def varies(key: str) -> bool:
        return len({json.dumps(r[key], default=str) for r in runs}) > 1

    show_b, show_lr = varies("batch_size"), varies("lr")
    labels = []
    for run in runs:
        text = f"{run['variant']}, K={run['workers']}"
        if show_b:
            text += f", B={run['batch_size']}"
        if show_lr:
            text += f", lr={run['lr']:g}"
        if "setting" in group_keys and run["setting"]:
            text += f" [{run['setting']}]"
        labels.append(text)
    return labels


def _baseline_keys(study: Study) -> list[str]:
    """What a speedup baseline must share with the runs it is compared to: the workload,
    and the ``setting`` (epochs, schedule, ... when the study varies them) if any."""
    return ["workload", "setting"] if "setting" in study.group_keys else ["workload"]


def baseline_table(study: Study) -> pd.DataFrame:
    """Per workload (and setting): the completed K=1 runs whose mean wall time is the
    speedup's reference."""
    runs = study.runs
    keys = _baseline_keys(study)
    out = []
    for key, same in runs.groupby(keys, sort=False, dropna=False):
        assert isinstance(key, tuple), key
        base = same[(same["workers"] == 1) & (same["status"] == "completed")]
        out.append(
            {
                **dict(zip(keys, key)),
                "runs": len(base),
                "variants": ", ".join(sorted(base["variant"].unique(), key=natural_key)),
                "seeds": ", ".join(str(s) for s in sorted(base["seed"].unique())),
                "run_ids": ", ".join(base["run_id"]),
                "wall_seconds_mean": base["wall_seconds"].mean() if len(base) else math.nan,
                "wall_seconds_std": base["wall_seconds"].std(ddof=1) if len(base) else math.nan,
            }
        )
    out.sort(key=lambda r: tuple(natural_key(str(r[k])) for k in keys))
    columns = [*keys, "runs", "variants", "seeds", "run_ids", "wall_seconds_mean", "wall_seconds_std"]
    return pd.DataFrame(out, columns=columns)


def summary_table(study: Study) -> pd.DataFrame:
    """Mean ± std over the completed runs (seeds) of each group, and speedup against K=1."""
    runs = study.runs[study.runs["status"] == "completed"]
    keys = study.group_keys
    columns = [*keys, "group", "n_seeds", "seeds"]
    for name in MEAN_STD:
        columns += [f"{name}_mean", f"{name}_std"]
    columns += ["speedup", *[f"{name}_mean" for name in MEAN_ONLY], "period"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    base_keys = _baseline_keys(study)
    baseline = {
        tuple(r[k] for k in base_keys): r["wall_seconds_mean"]
        for r in baseline_table(study).to_dict("records")
    }
    out = []
    for key, group in runs.groupby(keys, sort=False, dropna=False):
        assert isinstance(key, tuple), key
        row: dict[str, Any] = dict(zip(keys, key))
        row["group"] = group["group"].iloc[0]
        row["n_seeds"] = len(group)
        row["seeds"] = ", ".join(str(s) for s in sorted(group["seed"]))
        for name in MEAN_STD:
            row[f"{name}_mean"] = group[name].mean()
            row[f"{name}_std"] = group[name].std(ddof=1)  # NaN with one seed
        base = baseline.get(tuple(row[k] for k in base_keys), math.nan)
        row["speedup"] = base / row["wall_seconds_mean"]
        for name in MEAN_ONLY:
            row[f"{name}_mean"] = group[name].mean()
        row["period"] = group["period"].iloc[0]
        out.append(row)
    return pd.DataFrame(out, columns=columns)


def status_table(study: Study) -> pd.DataFrame:
    """Per group: how many runs completed, failed, diverged, with the errors."""
    keys = study.group_keys
    out = []
    for key, group in study.runs.groupby(keys, sort=False, dropna=False):
        assert isinstance(key, tuple), key
        row: dict[str, Any] = dict(zip(keys, key))
        row["group"] = group["group"].iloc[0]
        counts = group["status"].value_counts()
        for status in ("completed", "failed", "diverged"):
            row[status] = int(counts.get(status, 0))
        row["runs"] = len(group)
        bad = group[group["status"] != "completed"]
        row["errors"] = "\n".join(
            f"seed {r['seed']} ({r['status']}, run {r['run_id']}): {r['error'] or 'no error recorded'}"
            for r in bad.to_dict("records")
        )
        out.append(row)
    return pd.DataFrame(out, columns=[*keys, "group", "completed", "failed", "diverged", "runs", "errors"])


# Per-row cluster estimates (``report.estimates``), averaged like the measured columns.
ESTIMATE_CURVES = ["est_compute_seconds", "est_comm_seconds", "est_total_seconds"]


def curves(study: Study) -> pd.DataFrame:
    """Per group and evaluation step: mean over the completed seeds of epoch, wall time,
    test accuracy and train loss (and the estimated times on a cluster, when the metrics
    carry them)."""
    done = study.runs.loc[study.runs["status"] == "completed", ["run_id", "group", "workload"]]
    estimated = [c for c in ESTIMATE_CURVES if c in study.metrics.columns]
    columns = [
        "workload",
        "group",
        "step",
        "epoch",
        "wall_seconds",
        "test_accuracy",
        "train_loss",
        *estimated,
    ]
    if done.empty or study.metrics.empty:
        return pd.DataFrame(columns=columns)
    rows = study.metrics.merge(done, on="run_id")
    values = ["epoch", "wall_seconds", "test_accuracy", "train_loss", *estimated]
    for name in values:
        rows[name] = pd.to_numeric(rows[name], errors="coerce")
    # Before the first step there is no train loss to report, only a placeholder.
    rows.loc[pd.to_numeric(rows["step"], errors="coerce") == 0, "train_loss"] = np.nan
    out = rows.groupby(["workload", "group", "step"], sort=False)[values].mean().reset_index()
    return out[columns]
