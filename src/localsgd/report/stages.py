"""A study in stages in the report: per configuration of an earlier stage, what its runs
reached and took, and what the later stage's runs started from their models reached.

STILT's question -- does the way a model was (continued-)pretrained change how good it is
downstream? -- is one row per pretraining configuration: its final primary metric and wall
time, then the fine-tuning runs' final metrics (mean ± std over every fine-tuning run of
its models: seeds, and the pretraining seeds if several). Read from the store alone: the
plan's ``stages`` (which stage starts from which), each run's ``stage`` in the plan, and a
later-stage run's ``from_run`` in its config. A run of the earlier stage that failed or
exported no model had no later-stage runs: the row says so. Runs of the later stage that
did not start from an earlier stage's model (the model the earlier stage itself started
from, say) make a row of their own, the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from localsgd.records import Metric
from localsgd.report.render import Table, short_error
from localsgd.report.rounding import fmt_pm
from localsgd.report.tables import Study

FROM_RUN = "config.from_run.run_id"
"""The runs frame's column of a later-stage run's source run id."""


def later_stages(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The plan's stages that start from an earlier one."""
    stages = plan.get("stages")
    if not isinstance(stages, list):
        return []
    return [s for s in stages if isinstance(s, dict) and isinstance(s.get("from_stage"), str)]


def _planned(plan: Mapping[str, Any], stage: str) -> list[str]:
    runs = plan.get("runs")
    return [
        str(r["run_id"])
        for r in runs or []
        if isinstance(r, dict) and r.get("stage") == stage and "run_id" in r
    ]


def _metric_cells(frame: pd.DataFrame, metrics: Sequence[Metric]) -> list[str]:
    done = frame[frame["status"] == "completed"] if len(frame) else frame
    cells = []
    for m in metrics:
        column = f"final_{m.name}"
        values = (
            done[column].astype(float) if column in done.columns and len(done) else pd.Series(dtype=float)
        )
        values = values[values.map(math.isfinite)]
        cells.append(fmt_pm(values.mean(), values.std(ddof=1), m.scale) if len(values) else "")
    return cells


def _seconds(frame: pd.DataFrame) -> str:
    done = frame[frame["status"] == "completed"]
    return fmt_pm(done["wall_seconds"].mean(), done["wall_seconds"].std(ddof=1)) if len(done) else ""


def _count(frame: pd.DataFrame, planned: int) -> str:
    done = int((frame["status"] == "completed").sum()) if len(frame) else 0
    return f"{done}/{planned}"


def stage_table(study: Study, stage: Mapping[str, Any]) -> tuple[Table, list[str]] | None:
    """The table of one later stage against the stage it starts from (None when neither
    has a finished run), and the notes under it."""
    plan = study.plan
    name, source = str(stage["name"]), str(stage["from_stage"])
    runs = study.runs if FROM_RUN in study.runs.columns else study.runs.assign(**{FROM_RUN: math.nan})
    source_ids = _planned(plan, source)
    first = runs[runs["run_id"].isin(source_ids)]
    second = runs[runs["run_id"].isin(set(_planned(plan, name)))]
    if first.empty and second.empty:
        return None
    first_metric = _stage_metric(study, first)
    second_metrics = _stage_metrics(study, second)
    per_source = int(stage.get("runs_per_source_run") or 0)
    skipped = {
        str(s.get("run_id")): s
        for s in plan.get("skipped") or []
        if isinstance(s, dict) and s.get("stage") == name
    }
    headers = [f"{source} configuration", f"{source} runs"]
    if first_metric is not None:
        headers.append(
            f"{first_metric.title}{f' ({first_metric.unit})' if first_metric.unit else ''} (final, test)"
        )
    headers += ["wall time (s)", f"{name} runs"]
    headers += [f"{m.title}{f' ({m.unit})' if m.unit else ''}" for m in second_metrics]
    headers.append("notes")
    rows: list[list[str]] = []
    notes: list[str] = []
    reference = second[second[FROM_RUN].isna()]
    if len(reference):
        paths = sorted(
            {str(p) for p in reference.get("config.workload.model.path", pd.Series(dtype=object)).dropna()}
        )
        label = f"no {source} run" + (f" ({', '.join(paths)})" if paths else "")
        rows.append(
            [
                label,
                "",
                *([""] if first_metric is not None else []),
                "",
                _count(reference, len(reference)),
                *_metric_cells(reference, second_metrics),
                "the reference: not trained in stage " + source,
            ]
        )
    order = {rid: i for i, rid in enumerate(source_ids)}
    first = first.assign(_order=first["run_id"].map(order)).sort_values("_order")
    labels = configuration_labels(first)
    for group, part in first.groupby("group", sort=False):
        ids = list(part["run_id"])
        mine = second[second[FROM_RUN].isin(ids)]
        note = []
        for rid in ids:
            if rid in skipped:
                s = skipped[rid]
                note.append(
                    f"run {rid} {short_error(str(s.get('reason', '')), 120)}: its {s.get('runs', per_source)} {name} runs skipped"
                )
        missing = [
            rid
            for rid in ids
            if rid not in skipped and part.loc[part["run_id"] == rid, "status"].iloc[0] != "completed"
        ]
        note += [f"run {rid} {part.loc[part['run_id'] == rid, 'status'].iloc[0]}" for rid in missing]
        made = per_source * (len(ids) - sum(rid in skipped for rid in ids))
        rows.append(
            [
                labels[str(group)],
                _count(part, len(ids)),
                *(_metric_cells(part, [first_metric]) if first_metric is not None else []),
                _seconds(part),
                _count(mine, made),
                *_metric_cells(mine, second_metrics),
                "; ".join(note),
            ]
        )
    pending = [rid for rid in source_ids if rid not in set(runs["run_id"])]
    if pending:
        notes.append(
            f"{len(pending)} run(s) of stage {source} have not finished: their {name} runs are not made yet."
        )
    return Table(headers, rows), notes


def configuration_labels(frame: pd.DataFrame) -> dict[str, str]:
    """Per ``group`` of ``frame`` (one stage's runs), a label of what sets it apart within
    the stage: variant and K, with the engine, B and lr where they vary; the report's
    group label where that would not tell two groups apart."""
    shown = [c for c in ("engine", "batch_size", "lr") if frame[c].nunique(dropna=False) > 1]
    names = {"engine": "{}", "batch_size": "B={}", "lr": "lr={:g}"}
    labels: dict[str, str] = {}
    for group, part in frame.groupby("group", sort=False):
        row = part.iloc[0]
        labels[str(group)] = ", ".join(
            [f"{row['variant']}, K={row['workers']}", *(names[c].format(row[c]) for c in shown)]
        )
    if len(set(labels.values())) < len(labels):
        return {group: group for group in labels}
    return labels


def _stage_metric(study: Study, frame: pd.DataFrame) -> Metric | None:
    workloads = list(dict.fromkeys(frame["workload"])) if len(frame) else []
    return study.primary(workloads[0]) if len(workloads) == 1 else None


def _stage_metrics(study: Study, frame: pd.DataFrame) -> list[Metric]:
    workloads = list(dict.fromkeys(frame["workload"])) if len(frame) else []
    return list(study.declared.get(workloads[0], ())) if len(workloads) == 1 else []

