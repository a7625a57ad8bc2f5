"""With a target (``--target`` or the study's ``[study] target``): "Steps to result": the
rule, the targets, one row per cell (:mod:`~localsgd.report.steps`) and its figures
(:mod:`~localsgd.report.steps_plots`); workbook sheet ``steps_to_result``."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from localsgd.report import steps, steps_plots, workbook
from localsgd.report.columns import NOT_APPLICABLE
from localsgd.report.render import Bullets, Heading, Table, frame_rows
from localsgd.report.rounding import fmt, fmt_pm
from localsgd.report.section import Context, Drawing, Parts, Shown
from localsgd.report.selection import Selection

RULE = (
    "Steps to result of a cell (workload, variant, K, B, and the config keys that set it apart): "
    "the smallest, over its trials (runs that differ only in their searched metaparameters and "
    "learning rate), of the trial's mean over its seeds of the first evaluated step at which the "
    "metric strictly crosses the target on the split named above (google-research batch_science's "
    "measurement); seeds are replicates of a trial, never trials of their own, and a trial "
    "reaches the target only when every seed does; ± is the std over seeds. reached = the trials "
    "that reached it; the best trial's metaparameters are those of that trial, and its test "
    "metric is given at the crossing and at the end of training. Resolution: the evaluation "
    "interval (train.eval_every)."
)
REGIMES = (
    f"Regimes along a curve, from the local slope of log steps against log K·B between "
    f"neighbouring batches (the first batch takes its first segment's): slope ≤ {steps.PERFECT:g} "
    f"perfect scaling, ≥ {steps.MAXIMAL:g} maximal data parallelism, in between diminishing returns "
    "(these thresholds are this project's heuristic, not Shallue et al.'s)."
)
ROUNDS = "Communication rounds: the synchronisations counted up to the crossing evaluation (K>1)."


def parts(ctx: Context) -> Parts:
    table = ctx.step_table
    if table is None:
        return Parts()
    drawings = [
        Drawing(
            "steps_to_result",
            "Steps to result against the global batch K·B (log-log; the best trial's mean ± std over its seeds; "
            "dash-dotted: perfect scaling from each curve's smallest batch; segment styles: the regimes)",
            lambda: steps_plots.steps_to_result(table),
        ),
        Drawing(
            "steps_to_result_normalised",
            "Steps to result divided by each curve's steps at its smallest batch (log-log)",
            lambda: steps_plots.steps_normalised(table),
        ),
        Drawing(
            "best_metaparameters",
            "The best trial's learning rate and momentum against the global batch K·B",
            lambda: steps_plots.best_metaparameters(table),
        ),
        Drawing(
            "local_sgd_steps_to_result",
            "Local SGD: optimizer steps and communication rounds to result against the effective "
            "batch K·B, one line per variant (H)",
            lambda: steps_plots.local_sgd_steps(table),
        ),
    ]
    return Parts(
        [
            Heading(2, "Steps to result"),
            Bullets([*_target_lines(ctx.goals, ctx.select), RULE, REGIMES, ROUNDS]),
            _table(ctx.goals, table),
            *(Shown(d) for d in drawings),
        ],
        {"steps_to_result": workbook.Sheet(table, "curve")},
    )


def _target_lines(goals: dict[str, steps.Goal], select: Selection) -> list[str]:
    return [
        f"Target for {w}: {select.split(w)} {g.metric.title.removeprefix('test ')} "
        f"{'>' if g.metric.higher_is_better else '<'} {fmt(g.value, g.metric.scale)}{g.metric.unit} "
        f"({g.how}); {select.sentence(w).split(': ', 1)[1]}."
        for w, g in goals.items()
    ]


def _table(goals: dict[str, steps.Goal], table: pd.DataFrame) -> Table:
    return frame_rows(
        table,
        [
            ("workload", lambda r: str(r.workload)),
            ("curve", lambda r: str(r.curve)),
            ("K", lambda r: str(r.workers)),
            ("B", lambda r: str(r.batch_size)),
            ("K·B", lambda r: str(r.global_batch)),
            ("reached", lambda r: f"{r.reached}/{r.trials}"),
            ("seeds", lambda r: str(r.seeds)),
            ("steps", lambda r: fmt_pm(r.steps, r.steps_std) if math.isfinite(r.steps) else "not reached"),
            ("epochs", lambda r: fmt(r.epochs)),
            ("rounds", lambda r: NOT_APPLICABLE if int(r.workers) == 1 else fmt(r.rounds)),
            ("slope", lambda r: fmt(r.slope)),
            ("regime", lambda r: str(r.regime)),
            ("best trial", lambda r: str(r.best_metaparameters)),
            ("test at result", lambda r: _metric_value(goals, r, r.test_at_result)),
            ("final test", lambda r: _metric_value(goals, r, r.final_test)),
        ],
    )


def _metric_value(goals: dict[str, steps.Goal], row: Any, value: float) -> str:
    """A value of the row's target metric, as the report shows it (blank without one)."""
    metric = goals[str(row.workload)].metric
    return f"{fmt(value, metric.scale)}{metric.unit}" if math.isfinite(value) else ""
