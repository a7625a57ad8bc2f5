"""From a store to pandas tables: one row per run, then mean ± std over seeds per group.

A *group* is one point of a study's grid: (workload, variant, K workers, per-worker batch B,
lr), plus any other config key that varies across the study (``setting``). Only completed
runs enter the means; failed, diverged and unreadable runs are counted in the status table.
Every number a workload evaluates comes from the metrics it declared in its records.
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

from localsgd.records import Metric, MetricsRow, RecordError, RunRecord, Store
from localsgd.report.labels import algorithm_name, line_variant, period, variant_label
from localsgd.report.rounding import ratio_std
from localsgd.util.nest import flatten

log = logging.getLogger(__name__)

GROUP_KEYS = ["workload", "variant", "workers", "batch_size", "lr"]

VALIDATION = "validation_"
"""The prefix of a metric's columns on the validation split: ``validation_accuracy`` in the
metrics frame, ``final_validation_accuracy`` and ``best_validation_accuracy`` per run; the
unprefixed columns are the test split's."""

# Config keys that are the group key, the seed, or only a label: never part of ``setting``.
# The engine is a group key of its own when it varies, but not part of the speedup
# baseline: one worker is one worker on every engine.
# ``fixed`` only says how the batch was derived (the batch is a group key already).
_NOT_SETTINGS = (
    "name",
    "seed",
    "workload.name",
    "workers",
    "data.batch_size",
    "optimizer.lr",
    "engine",
    "fixed",
    # How often a run is evaluated changes no training step: studies evaluate K=1 runs
    # less often per step so that every K is evaluated at the same epochs.
    "train.eval_every",
)

# Per-run quantities averaged over seeds (mean and std, ddof=1) in the summary table,
# besides the final and best value of every declared metric.
MEAN_STD = ["final_train_loss", "wall_seconds", "samples_per_second", "bytes"]
MEAN_ONLY = ["syncs"]
COUNTER_COLUMNS = ("bytes", "syncs", "collectives", "comm_seconds")


@dataclass(frozen=True)
class Problem:
    """Something of a run the report could not read as the run left it."""

    run_id: str
    file: Path
    """The run folder, or the file in it."""
    what: str

    def line(self) -> str:
        """``run ID: FILE: what``."""
        return f"run {self.run_id}: {self.file}: {self.what}"


def _problem(run_id: str, file: Path, message: str) -> Problem:
    """A :class:`Problem` from a ``RecordError`` message that starts with the file it names."""
    what = message.removeprefix(str(file)).lstrip(" ,:")
    return Problem(run_id, file, what or message)


@dataclass
class Study:
    """Everything the report shows, read from one store."""

    root: Path
    runs: pd.DataFrame
    """One row per finished run: identity, group key, final metrics, flattened config."""
    metrics: pd.DataFrame
    """Every evaluation row of every run, with ``run_id``; one column per declared metric."""
    group_keys: list[str]
    """``GROUP_KEYS``, plus ``engine`` when runs of several engines are compared and
    ``setting`` when some other config key varies."""
    plan: dict[str, Any]
    """The study's ``plan.json`` (name, description, planned runs), ``{}`` without one
    (a store written by ``localsgd train``)."""
    final_counters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per run id, the communicator's final counters: ``{"steps": s, "by_scope": {scope:
    {"collectives", "bytes", "seconds"}}}`` (see :func:`final_counters`)."""
    declared: dict[str, tuple[Metric, ...]] = field(default_factory=dict)
    """Per workload, the metrics its runs declared (in their order)."""
    primaries: dict[str, str] = field(default_factory=dict)
    """Per workload, the name of its primary metric."""
    problems: list[Problem] = field(default_factory=list)
    """What could not be read, one per unreadable or missing run and per metrics stream cut
    off mid-line, in the order of the runs: the report is incomplete by these."""

    def metric_list(self) -> list[Metric]:
        """Every declared metric of the study, each name once."""
        seen: dict[str, Metric] = {}
        for metrics in self.declared.values():
            for m in metrics:
                seen.setdefault(m.name, m)
        return list(seen.values())

    def primary(self, workload: str) -> Metric | None:
        """The primary metric of ``workload`` (None when none of its runs declared one)."""
        name = self.primaries.get(workload)
        return next((m for m in self.declared.get(workload, ()) if m.name == name), None)


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort ``H=4`` before ``H=16``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _number(value: Any) -> float:
    """A float for a JSON value: None and non-numbers become NaN (inf stays inf)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def workload_of(config: Mapping[str, Any]) -> str:
    spec = config.get("workload")
    return str(spec.get("name", "?") if isinstance(spec, Mapping) else spec or "?")


def _run_row(record: RunRecord, rows: list[MetricsRow]) -> dict[str, Any]:
    config = record.config
    info = record.status_info
    last = rows[-1] if rows else info.final
    wall = _number(last.wall_seconds if last else info.wall_seconds)
    samples = _number(last.samples if last else info.samples)
    counters = info.counters
    engine = info.engine.name if info.engine else str(config.get("engine", "?"))
    row: dict[str, Any] = {
        "run_id": record.run_id,
        "name": record.name,
        "status": "unreadable" if record.problem else record.status,
        "error": record.problem or (info.error.line() if info.error else None),
        "workload": workload_of(config),
        "variant": variant_label(config),
        "line_variant": line_variant(config),
        "algorithm": algorithm_name(config),
        "workers": int(config.get("workers", 1)),
        "batch_size": int((config.get("data") or {}).get("batch_size", 0)),
        "lr": _number((config.get("optimizer") or {}).get("lr")),
        "seed": config.get("seed"),
        "period": period(config),
        "engine": _engine_label(engine, config.get("engine_options")),
        "engine_name": engine,
        "real_wall_time": info.engine.real_wall_time if info.engine else True,
        "evaluations": len(rows),
        "final_step": _number(last.step if last else info.steps),
        "final_epoch": _number(last.epoch if last else info.epochs),
        "final_samples": samples,
        "final_train_loss": _number(last.train_loss if last else None),
        "wall_seconds": wall,
        "samples_per_second": samples / wall if wall and wall > 0 else math.nan,
    }
    # Communication totals: the run's final counters (they include the averaging on exit,
    # as the cost-model estimates do), else the last evaluation's.
    for key in COUNTER_COLUMNS:
        source = counters if counters is not None else last
        row[key] = _number(getattr(source, key)) if source is not None else math.nan
    if row["workers"] == 1:
        # One worker communicates nothing: the sync points its algorithm counted are steps.
        row["syncs"] = math.nan
    for m in info.metrics:
        row[f"final_{m.name}"] = _number(last.metrics.get(m.name)) if last else math.nan
        row[f"best_{m.name}"] = m.best([_number(r.metrics.get(m.name)) for r in rows])
        row[f"final_{VALIDATION}{m.name}"] = _number(last.validation.get(m.name)) if last else math.nan
        row[f"best_{VALIDATION}{m.name}"] = m.best([_number(r.validation.get(m.name)) for r in rows])
    return row


SCOPE_KEYS = (
    "collectives", "bytes", "seconds", "gathers", "gathered_bytes", "encoded", "decoded", "codec_seconds"
)  # fmt: skip
"""A scope's counters; all but the first three only where a compressed average happened
(see :class:`localsgd.comm.base.CommStats`)."""


def row_counters(row: Mapping[str, Any]) -> dict[str, dict[str, float]] | None:
    """The cumulative per-scope counters of a metrics row: its ``by_scope``, or, when it
    has none, its totals counted as world scope. None when the row has neither."""
    by_scope = row.get("by_scope")
    if isinstance(by_scope, Mapping) and by_scope:
        out = {
            str(scope): {k: _number(v.get(k, 0)) for k in SCOPE_KEYS if k in v or k in SCOPE_KEYS[:3]}
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


def final_counters(record: RunRecord, rows: list[MetricsRow]) -> dict[str, Any]:
    """A run's final counters: the status's (they include the closing average of
    ``DataParallel.__exit__``, which delivers the final model), else the last evaluation
    row's. ``{"steps": s, "by_scope": {...} or None}``."""
    info = record.status_info
    last = rows[-1] if rows else info.final
    steps = _number(last.step if last else info.steps)  # training-loop steps of B samples each
    if info.counters is not None:
        counted = row_counters(info.counters.__dict__)
        if counted is not None:
            return {"steps": steps, "by_scope": counted}
    return {"steps": steps, "by_scope": row_counters(last.__dict__) if last else None}


def _metric_rows(record: RunRecord, rows: list[MetricsRow]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        plain = {k: v for k, v in r.__dict__.items() if k not in ("metrics", "validation")}
        out.append(
            {
                "run_id": record.run_id,
                **plain,
                **{k: _number(v) for k, v in r.metrics.items()},
                **{f"{VALIDATION}{k}": _number(v) for k, v in r.validation.items()},
            }
        )
    return out


def load(store_dir: str | Path) -> Study:
    """Read a store's finished runs. ``ValueError`` if it is not a store, holds none, or
    holds records of another version."""
    store = Store(store_dir, create=False)
    records = store.records()
    if not records:
        raise ValueError(
            f"store {str(store.root)!r} has no finished runs (completed, failed or diverged): "
            "nothing to report"
        )
    run_rows, metric_rows, configs = [], [], []
    counters: dict[str, dict[str, Any]] = {}
    declared: dict[str, tuple[Metric, ...]] = {}
    primaries: dict[str, str] = {}
    problems: list[Problem] = []
    for record in records:
        rows = _read_rows(record, problems)
        run_rows.append(_run_row(record, rows))
        counters[record.run_id] = final_counters(record, rows)
        metric_rows += _metric_rows(record, rows)
        configs.append(flatten(record.config))
        _declare(record, declared, primaries)
    group_keys = _settings(run_rows, configs)
    runs = _runs_frame(run_rows, configs, declared, group_keys)
    metrics = pd.DataFrame(metric_rows)
    if metrics.empty:
        metrics = pd.DataFrame(columns=["run_id", "step", "epoch", "wall_seconds", "train_loss"])
    return Study(
        Path(store.root), runs, metrics, group_keys, _plan(store), counters, declared, primaries, problems
    )


def _read_rows(record: RunRecord, problems: list[Problem]) -> list[MetricsRow]:
    """The run's metrics rows; what cannot be read is added to ``problems`` (and, when it
    makes the run unreadable, to ``record.problem``)."""
    if record.problem:
        missing = not record.path.is_dir()
        file = record.path if missing else record.path / "status.json"
        problems.append(
            Problem(record.run_id, file, "the run folder is missing")
            if missing
            else _problem(record.run_id, file, record.problem)
        )
        return []
    path = record.path / "metrics.jsonl"
    try:
        rows, cut = record.metrics_stream()
    except RecordError as exc:
        record.problem = str(exc)
        problems.append(_problem(record.run_id, path, str(exc)))
        return []
    if cut is not None:
        problems.append(
            Problem(
                record.run_id,
                path,
                f"line {cut} is cut off mid-line (dropped; {len(rows)} evaluation rows read): "
                "the run's curves end early",
            )
        )
    return rows


def _declare(record: RunRecord, declared: dict[str, tuple[Metric, ...]], primaries: dict[str, str]) -> None:
    """Add the metrics ``record``'s workload declared (each name once) and its primary one
    (the first run's)."""
    info = record.status_info
    if not info.metrics or record.problem:
        return
    workload = workload_of(record.config)
    known = {m.name for m in declared.get(workload, ())}
    declared[workload] = declared.get(workload, ()) + tuple(m for m in info.metrics if m.name not in known)
    if info.primary:
        primaries.setdefault(workload, info.primary)


def _settings(run_rows: list[dict[str, Any]], configs: list[dict[str, Any]]) -> list[str]:
    """Fill each run row's ``setting`` and return the group keys: :data:`GROUP_KEYS`, and
    the engine and setting where they vary."""
    # Config keys that differ between runs but are not in the group key would otherwise
    # silently merge different experiments into one mean.
    # Only keys that vary among the runs of one workload: the options of different
    # workloads (their data paths, say) differ, but each workload has its own panels.
    varying = _varying_settings([str(r["workload"]) for r in run_rows], configs)
    names = _short_names(varying)
    for row, config in zip(run_rows, configs):
        row["setting"] = ", ".join(f"{names[k]}={config.get(k)}" for k in varying)
    group_keys = list(GROUP_KEYS)
    if len({r["engine"] for r in run_rows}) > 1:
        group_keys.append("engine")
    if any(row["setting"] for row in run_rows):
        group_keys.append("setting")
    return group_keys


def _runs_frame(
    run_rows: list[dict[str, Any]],
    configs: list[dict[str, Any]],
    declared: dict[str, tuple[Metric, ...]],
    group_keys: list[str],
) -> pd.DataFrame:
    """The runs in order, a column for every declared metric (NaN where a run has none),
    their group labels and their flattened configs (``config.KEY``)."""
    order = sorted(range(len(run_rows)), key=lambda i: _sort_key(run_rows[i]))
    run_rows = [run_rows[i] for i in order]
    configs = [configs[i] for i in order]
    runs = pd.DataFrame(run_rows)
    for m in {m.name: m for ms in declared.values() for m in ms}.values():
        for prefix in ("final_", "best_", f"final_{VALIDATION}", f"best_{VALIDATION}"):
            if f"{prefix}{m.name}" not in runs.columns:
                runs[f"{prefix}{m.name}"] = math.nan
    runs["group"] = _group_labels(run_rows, group_keys)
    config_frame = pd.DataFrame([{f"config.{k}": v for k, v in c.items()} for c in configs])
    return pd.concat([runs, config_frame], axis=1)


def _plan(store: Store) -> dict[str, Any]:
    try:
        return store.plan()
    except RecordError as exc:
        log.warning("ignoring the plan: %s", exc)
        return {}


def _engine_label(engine: str, options: Any) -> str:
    """``"hogwild procs_per_device=2"``: the engine with its options, if any. Engine options
    say how the same training is run (processes per device, simulated worker speeds), so
    they go with the engine (a group key where it varies), not with the ``setting`` that a
    speedup baseline must share."""
    if not isinstance(options, Mapping) or not options:
        return engine
    return (
        engine
        + " "
        + ", ".join(
            f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in sorted(options.items())
        )
    )


def _varying_settings(workloads: list[str], configs: list[dict[str, Any]]) -> list[str]:
    """Config keys (flattened) whose value differs between runs of the same workload,
    besides the group key, the seed and the algorithm's own table."""
    keys = sorted({k for c in configs for k in c})
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for workload, config in zip(workloads, configs):
        by_workload.setdefault(workload, []).append(config)

    def varies(key: str, group: list[dict[str, Any]]) -> bool:
        return len({json.dumps(c.get(key, "<unset>"), sort_keys=True, default=str) for c in group}) > 1

    return [
        k
        for k in keys
        if not k.startswith(("algorithm.", "engine_options."))
        and k not in _NOT_SETTINGS
        and any(varies(k, group) for group in by_workload.values())
    ]


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key without its top-level table where it has three parts or more
    (``workload.data.train_subset`` -> ``data.train_subset``, ``comm.delay.world`` ->
    ``delay.world``; ``train.epochs`` stays), unless two keys would then read the same."""
    short = {k: k.split(".", 1)[1] if k.count(".") >= 2 else k for k in keys}
    clashes = {v for v in short.values() if list(short.values()).count(v) > 1}
    return {k: (k if v in clashes else v) for k, v in short.items()}


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
        if "engine" in group_keys:
            text += f", {run['engine']}"
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
    """Mean ± std over the completed runs (seeds) of each group, and speedup against K=1.

    ``speedup`` = the baseline's mean wall time T₁ / the group's mean wall time T;
    ``speedup_std`` propagates both spreads, ``speedup · sqrt((σ₁/T₁)² + (σ/T)²)`` with σ
    the std over seeds (:func:`~localsgd.report.rounding.ratio_std`), and is 0 for the
    group whose runs are the baseline itself (its speedup is 1 by definition).
    """
    runs = study.runs[study.runs["status"] == "completed"]
    keys = study.group_keys
    columns = [*keys, "group", "algorithm", "n_seeds", "seeds"]
    measured = [
        f"{p}_{m.name}" for m in study.metric_list() for p in ("final", "best", f"final_{VALIDATION.rstrip('_')}")
    ] + MEAN_STD
    for name in measured:
        columns += [f"{name}_mean", f"{name}_std"]
    columns += ["speedup", "speedup_std", *[f"{name}_mean" for name in MEAN_ONLY], "period", "line_variant"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    base_keys = _baseline_keys(study)
    baseline = {
        tuple(r[k] for k in base_keys): r for r in baseline_table(study).to_dict("records") if r["runs"]
    }
    out = []
    for key, group in runs.groupby(keys, sort=False, dropna=False):
        assert isinstance(key, tuple), key
        row: dict[str, Any] = dict(zip(keys, key))
        row["group"] = group["group"].iloc[0]
        row["algorithm"] = group["algorithm"].iloc[0]
        row["n_seeds"] = len(group)
        row["seeds"] = ", ".join(str(s) for s in sorted(group["seed"]))
        for name in measured:
            row[f"{name}_mean"] = group[name].mean()
            row[f"{name}_std"] = group[name].std(ddof=1)  # NaN with one seed
        base = baseline.get(tuple(row[k] for k in base_keys))
        if base is None:
            row["speedup"] = row["speedup_std"] = math.nan
        elif set(base["run_ids"].split(", ")) == set(group["run_id"]):
            row["speedup"], row["speedup_std"] = 1.0, 0.0
        else:
            t1, s1 = base["wall_seconds_mean"], base["wall_seconds_std"]
            row["speedup"] = t1 / row["wall_seconds_mean"]
            row["speedup_std"] = ratio_std(t1, s1, row["wall_seconds_mean"], row["wall_seconds_std"])
        for name in MEAN_ONLY:
            row[f"{name}_mean"] = group[name].mean()
        row["period"] = group["period"].iloc[0]
        row["line_variant"] = group["line_variant"].iloc[0]
        out.append(row)
    return pd.DataFrame(out, columns=columns)


STATUS_COLUMNS = ("completed", "failed", "diverged", "unreadable")


def status_table(study: Study) -> pd.DataFrame:
    """Per group: how many runs completed, failed, diverged, with the errors."""
    keys = study.group_keys
    out = []
    for key, group in study.runs.groupby(keys, sort=False, dropna=False):
        assert isinstance(key, tuple), key
        row: dict[str, Any] = dict(zip(keys, key))
        row["group"] = group["group"].iloc[0]
        counts = group["status"].value_counts()
        for status in STATUS_COLUMNS:
            row[status] = int(counts.get(status, 0))
        row["runs"] = len(group)
        bad = group[group["status"] != "completed"]
        row["errors"] = "\n".join(
            f"seed {r['seed']} ({r['status']}, run {r['run_id']}): {r['error'] or 'no error recorded'}"
            for r in bad.to_dict("records")
        )
        out.append(row)
    return pd.DataFrame(out, columns=[*keys, "group", *STATUS_COLUMNS, "runs", "errors"])


# Per-row cluster estimates (``report.estimates``), averaged like the measured columns.
ESTIMATE_CURVES = ["est_compute_seconds", "est_comm_seconds", "est_total_seconds"]


def curves(study: Study) -> pd.DataFrame:
    """Per group and evaluation step: mean and std (``<name>_std``, ddof=1, NaN for one
    seed) over the completed seeds of epoch, wall time, train loss and every declared
    metric (and the estimated times on a cluster, when the metrics carry them); ``n`` is
    the number of seeds with that step."""
    done = study.runs.loc[study.runs["status"] == "completed", ["run_id", "group", "workload"]]
    estimated = [c for c in ESTIMATE_CURVES if c in study.metrics.columns]
    names = [m.name for m in study.metric_list() if m.name in study.metrics.columns]
    values = ["epoch", "wall_seconds", "train_loss", *names, *estimated]
    columns = ["workload", "group", "step", "n", *values, *[f"{v}_std" for v in values]]
    if done.empty or study.metrics.empty:
        return pd.DataFrame(columns=columns)
    rows = study.metrics.merge(done, on="run_id")
    for name in values:
        rows[name] = pd.to_numeric(rows[name], errors="coerce")
    grouped = rows.groupby(["workload", "group", "step"], sort=False)
    mean = grouped[values].mean()
    std = grouped[values].std(ddof=1).add_suffix("_std")
    count = grouped["run_id"].nunique().rename("n")
    out = pd.concat([count, mean, std], axis=1).reset_index()
    return out[columns]
