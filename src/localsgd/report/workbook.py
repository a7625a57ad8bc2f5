"""``results.xlsx``: the report's tables and every run's numbers, ready for a spreadsheet.

Every sheet has a header row frozen with its identity columns, a filter on every column,
and a number format on every numeric cell: the report's rounding rule
(:mod:`~localsgd.report.rounding`) gives the decimals, a metric the report shows in percent
is a percent cell (the stored number stays the fraction). Counters per scope are one column
each (``world.bytes``, ``block2.collectives``), and a run's config shows only the fields
that apply to it (no AdamW β on an SGD run). The ``units`` sheet names the unit and meaning
of every column of every sheet.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from localsgd.records import Metric
from localsgd.report.rounding import decimals, excel_format, number
from localsgd.report.tables import VALIDATION
from localsgd.util.files import atomic_path

# The run config holds every field of its tables, whichever of them the run uses; these
# apply only when another key has one of the given values (run/config.py; a test
# keeps the two in step).
APPLIES_WHEN: dict[str, tuple[str, tuple[Any, ...]]] = {
    "optimizer.momentum": ("optimizer.name", ("sgd",)),
    "optimizer.nesterov": ("optimizer.name", ("sgd",)),
    "optimizer.beta1": ("optimizer.name", ("adamw",)),
    "optimizer.beta2": ("optimizer.name", ("adamw",)),
    "optimizer.eps": ("optimizer.name", ("adamw",)),
    "schedule.milestones": ("schedule.name", ("step",)),
    "schedule.gamma": ("schedule.name", ("step",)),
    "schedule.base_batch": ("schedule.linear_scaling", (True,)),
}

# (unit, meaning) of the columns the report writes; metric columns, ``*_mean``/``*_std``
# pairs, ``config.*`` and per-scope counters are described by rule in :func:`describe`.
COLUMNS: dict[str, tuple[str, str]] = {
    "workload": ("", "workload: a registered name or an import path"),
    "variant": ("", "algorithm and the hyperparameters that set it apart"),
    "line_variant": ("", "the variant without its period H: what one line of the H·K figure joins"),
    "algorithm": ("", "algorithm family (registry name); one colour per family in the figures"),
    "workers": ("workers", "K, the number of workers"),
    "batch_size": ("samples", "per-worker batch B"),
    "lr": ("", "base learning rate (optimizer.lr)"),
    "engine": ("", "engine that ran the K workers, with its options (engine_options) if any"),
    "engine_name": ("", "the engine's registered name"),
    "setting": ("", "the other config keys that vary across the study"),
    "group": ("", "legend label: variant, K, and what else varies"),
    "n_seeds": ("runs", "completed seeds averaged"),
    "seeds": ("", "the seeds averaged"),
    "final_train_loss": ("", "train loss at the last evaluation (mean over workers since the one before)"),
    "train_loss": ("", "train loss, mean over workers since the previous evaluation"),
    "wall_seconds": ("s", "training wall time, evaluation excluded"),
    "samples_per_second": ("samples/s", "training samples of all workers per second of wall time"),
    "updates": ("updates", "updates the evaluated model received (every Hogwild process's step, a server's updates)"),
    "updates_per_second": ("updates/s", "updates per second of training wall time"),
    "bytes": ("B", "communication payload per worker, cumulative"),
    "syncs": ("syncs", "communication rounds (blank for K=1: one worker communicates nothing)"),
    "collectives": ("collectives", "collective operations per worker, cumulative"),
    "comm_seconds": ("s", "time inside collectives, cumulative"),
    "speedup": ("×", "the K=1 baseline's mean wall time / this group's mean wall time"),
    "speedup_std": ("×", "std of speedup, propagated: speedup · sqrt((σ₁/T₁)² + (σ/T)²)"),
    "period": ("steps", "H: local steps between two averagings (the algorithm's sync_period)"),
    "run_id": ("", "run id (hash of the resolved config)"),
    "name": ("", "run name"),
    "status": ("", "completed, failed, diverged or unreadable"),
    "error": ("", "the root error of a failed or diverged run"),
    "seed": ("", "the run's seed"),
    "real_wall_time": ("", "whether the engine's wall time is a real K-worker time"),
    "evaluations": ("rows", "evaluations recorded"),
    "final_step": ("steps", "optimizer steps at the last evaluation"),
    "final_epoch": ("epochs", "epochs at the last evaluation"),
    "final_samples": ("samples", "training samples of all workers at the last evaluation"),
    "step": ("steps", "optimizer steps so far"),
    "epoch": ("epochs", "passes over the training set so far"),
    "samples": ("samples", "training samples of all workers so far"),
    "completed": ("runs", "runs that completed"),
    "failed": ("runs", "runs that failed"),
    "diverged": ("runs", "runs whose loss became NaN or inf"),
    "unreadable": ("runs", "runs whose record could not be read"),
    "runs": ("runs", "runs in the group"),
    "errors": ("", "the error of each run that did not complete"),
    "variants": ("", "the variants of the baseline runs"),
    "run_ids": ("", "the baseline's run ids"),
    "est_compute_per_step": ("s", "a worker's compute per step used by the estimate"),
    "est_compute_seconds": ("s", "estimated compute time on the cluster"),
    "est_comm_seconds": ("s", "estimated communication time on the cluster"),
    "est_total_seconds": ("s", "estimated training time on the cluster (compute + communication)"),
    "est_speedup": ("×", "estimated speedup over the K=1 baseline on the cluster"),
    "est_speedup_std": ("×", "std of est_speedup, propagated as for speedup"),
    "target_value": ("metric", "the primary metric's target of the time-to-target estimate"),
    "est_target_step": ("steps", "first evaluation step at or past the target"),
    "est_target_compute_seconds": ("s", "estimated compute time to the target"),
    "est_target_comm_seconds": ("s", "estimated communication time to the target"),
    "est_target_total_seconds": ("s", "estimated time to the target (blank unless every seed reached it)"),
    "est_target_reached": ("runs", "seeds that reached the target"),
    "subset": ("examples", "training subset: the first N examples after a seeded shuffle; all when unset"),
    "metric": ("", "the primary metric the final_* columns hold"),
    "final": ("metric", "the primary metric (column metric) at the last evaluation"),
    "front_bytes": ("", "yes: on the Pareto front of metric against bytes per worker; blank: not drawn"),
    "front_time": ("", "yes: on the Pareto front of metric against estimated time; blank: not drawn"),
    "item": ("", "cluster parameter or target"),
    "value": ("", "its value (seconds, bytes per second)"),
}
SETTINGS = {"lr", "seed"}
"""Numeric columns that are settings, not measurements: no rounding format."""
SCOPE_COUNTERS = {
    "collectives": ("collectives", "collectives in scope {scope}, cumulative"),
    "bytes": ("B", "payload per worker in scope {scope}, cumulative"),
    "seconds": ("s", "time in collectives of scope {scope}, cumulative"),
}
INTEGERS = {
    "workers", "batch_size", "n_seeds", "evaluations", "final_step", "step", "syncs", "collectives",
    "completed", "failed", "diverged", "unreadable", "runs", "period", "est_target_reached", "seed",
    "est_target_step", "samples", "final_samples", "bytes", "updates",
}  # fmt: skip


@dataclass(frozen=True)
class Column:
    unit: str
    meaning: str
    percent: bool = False
    integer: bool = False


def _metric(name: str, metrics: Mapping[str, Metric]) -> tuple[Metric, str, str] | None:
    """The metric a column is about, the column's prefix (``final_``, ``best_``, ``""``) and
    its split (``test``, or ``validation`` for a ``validation_`` column)."""
    for prefix in ("final_", "best_", ""):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if rest in metrics:
            return metrics[rest], prefix, "test"
        if rest.startswith(VALIDATION) and rest[len(VALIDATION) :] in metrics:
            return metrics[rest[len(VALIDATION) :]], prefix, "validation"
    return None


def describe(column: str, metrics: Mapping[str, Metric]) -> Column | None:
    """Unit and meaning of a column the report writes; None for one it does not know."""
    stat = ""
    base = column
    for suffix, text in (("_mean", "mean over seeds"), ("_std", "std over seeds (ddof=1)")):
        if column.endswith(suffix) and column not in COLUMNS:
            base, stat = column[: -len(suffix)], text
    found = _metric(base, metrics)
    if found is not None:
        metric, prefix, split = found
        when = {"final_": "at the last evaluation", "best_": "best over the evaluations", "": ""}[prefix]
        percent = metric.unit == "%" and metric.scale == 100
        unit = "% (stored as a fraction)" if percent else metric.unit
        if metric.scale != 1 and not percent:
            unit = f"{metric.unit} ÷ {metric.scale:g}"
        title = metric.title if split == "test" else f"{metric.title.removeprefix('test ')} on the validation split"
        meaning = ", ".join(t for t in (title, when, stat) if t)
        return Column(unit, meaning, percent=percent)
    if base.startswith("config."):
        return Column("", f"run config {base[len('config.') :]} (blank where it does not apply)")
    scoped = re.fullmatch(r"(.+)\.(collectives|bytes|seconds)", base)
    if scoped and base not in COLUMNS:
        unit, meaning = SCOPE_COUNTERS[scoped.group(2)]
        return Column(unit, meaning.format(scope=scoped.group(1)), integer=scoped.group(2) != "seconds")
    if base in COLUMNS:
        unit, meaning = COLUMNS[base]
        return Column(unit, ", ".join(t for t in (meaning, stat) if t), integer=base in INTEGERS and not stat)
    return None


def applicable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A flattened run config without the fields its own settings make moot."""
    out = {}
    for key, value in config.items():
        rule = APPLIES_WHEN.get(key)
        if rule is not None and config.get(rule[0]) not in rule[1]:
            continue
        out[key] = value
    return out


def runs_sheet(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table with moot config fields blank, all-blank columns dropped, and lists
    as plain text."""
    frame = runs.copy()
    config = [c for c in frame.columns if c.startswith("config.")]
    rows = []
    for record in frame[config].to_dict("records"):
        kept = applicable({k.removeprefix("config."): v for k, v in record.items()})
        rows.append({f"config.{k}": kept.get(k) for k in (c.removeprefix("config.") for c in config)})
    frame[config] = pd.DataFrame(rows, index=frame.index, columns=config)
    for column in config:
        frame[column] = frame[column].map(_cell)
    empty = [c for c in config if frame[c].isna().all()]
    return frame.drop(columns=empty)


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return value


def metrics_sheet(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Every evaluation row with its run's identity in front and one column per scope
    and counter instead of the nested ``by_scope``."""
    ident = runs[["run_id", "status", "workload", "variant", "workers", "batch_size", "seed"]]
    frame = metrics.merge(ident, on="run_id", how="left")
    if "by_scope" in frame.columns:
        scoped: list[dict[str, Any]] = []
        for value in frame["by_scope"]:
            row: dict[str, Any] = {}
            if isinstance(value, Mapping):
                for scope, counters in sorted(value.items()):
                    for key in SCOPE_COUNTERS:
                        if isinstance(counters, Mapping) and key in counters:
                            row[f"{scope}.{key}"] = number(counters[key])
            scoped.append(row)
        expanded = pd.DataFrame(scoped, index=frame.index)
        frame = pd.concat([frame.drop(columns=["by_scope"]), expanded], axis=1)
    front = list(ident.columns)
    return frame[front + [c for c in frame.columns if c not in front]]


@dataclass
class Sheet:
    frame: pd.DataFrame
    freeze_after: str | None = None
    """The last identity column kept in view when scrolling right."""


def _formats(frame: pd.DataFrame, metrics: Mapping[str, Metric]) -> dict[str, list[str | None]]:
    """Per numeric column, a number format per row: a ``*_mean``/``*_std`` pair (and
    ``speedup``/``speedup_std``) by the rule for mean ± std, other numbers alone."""
    out: dict[str, list[str | None]] = {}
    columns = list(frame.columns)
    for column in columns:
        info = describe(column, metrics)
        if (
            info is None
            or column in SETTINGS
            or column.startswith("config.")
            or not pd.api.types.is_numeric_dtype(frame[column])
            or frame[column].dtype == bool
        ):
            continue  # settings stay as written: lr 0.1, not 0.1000
        scale = 100.0 if info.percent else 1.0
        nan = pd.Series([math.nan] * len(frame), index=frame.index)
        if column.endswith("_std"):
            root = column[: -len("_std")]
            mean_column = root + "_mean" if root + "_mean" in columns else root
            means, stds = frame.get(mean_column, frame[column]), frame[column]
        else:
            root = column[: -len("_mean")] if column.endswith("_mean") else column
            means, stds = frame[column], frame.get(root + "_std", nan)
        formats: list[str | None] = []
        for mean, std in zip(means, stds):
            if not math.isfinite(number(mean)) and not column.endswith("_std"):
                formats.append(None)
            elif float(number(mean)).is_integer() and (info.integer or not math.isfinite(number(std))):
                formats.append("0")  # a count, or a whole number without spread (20 syncs)
            else:
                formats.append(excel_format(decimals(mean, std, scale), info.percent))
        out[column] = formats
    return out


def units_sheet(sheets: Mapping[str, Sheet], metrics: Mapping[str, Metric]) -> pd.DataFrame:
    rows = []
    for name, sheet in sheets.items():
        for column in sheet.frame.columns:
            info = describe(str(column), metrics)
            rows.append(
                {
                    "sheet": name,
                    "column": column,
                    "unit": info.unit if info else "",
                    "meaning": info.meaning if info else "",
                }
            )
    return pd.DataFrame(rows, columns=["sheet", "column", "unit", "meaning"])


_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_EXCEL_CELL_LIMIT = 32767


def _excel_safe(value: Any) -> Any:
    """openpyxl refuses control characters and Excel cells hold at most 32767 chars."""
    if isinstance(value, str):
        value = _ILLEGAL.sub("", value)
        if len(value) > _EXCEL_CELL_LIMIT:
            value = value[: _EXCEL_CELL_LIMIT - 1] + "…"
    return value


def _width(frame: pd.DataFrame, column: Any) -> float:
    sample = [len(str(v)) for v in frame[column].head(50) if v is not None and v == v]
    return min(max([len(str(column)), 8, *[min(s, 30) for s in sample]]) + 2, 42)


def write_workbook(path: Path, sheets: Mapping[str, Sheet], metrics: Sequence[Metric]) -> Path:
    """The sheets and a ``units`` sheet, written atomically."""
    by_name = {m.name: m for m in metrics}
    sheets = {**sheets, "units": Sheet(units_sheet(sheets, by_name), "column")}
    with atomic_path(path) as tmp:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            for name, sheet in sheets.items():
                frame = sheet.frame.copy()
                for column in frame.columns:
                    if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
                        frame[column] = frame[column].map(_excel_safe)
                title = name[:31]
                frame.to_excel(writer, sheet_name=title, index=False)
                ws = writer.sheets[title]
                columns = list(frame.columns)
                for index, formats in _formats(frame, by_name).items():
                    col = columns.index(index) + 1
                    for row, spec in enumerate(formats, start=2):
                        if spec is not None:
                            ws.cell(row, col).number_format = spec
                frozen = columns.index(sheet.freeze_after) + 2 if sheet.freeze_after in columns else 1
                ws.freeze_panes = ws.cell(2, frozen)
                ws.auto_filter.ref = ws.dimensions
                for i, column in enumerate(columns, start=1):
                    ws.column_dimensions[ws.cell(1, i).column_letter].width = _width(frame, column)
    return path
