"""The "Summary" table: per configuration, mean ± std over seeds of every metric's final
value and the primary metric's best, train loss, wall time, speedup, payload, syncs and
throughput."""

from __future__ import annotations

from localsgd.report.columns import NOT_APPLICABLE, key_columns, metric_columns, speedup
from localsgd.report.render import Heading, Table, frame_rows
from localsgd.report.rounding import fmt, fmt_bytes, fmt_pm
from localsgd.report.section import Context, Parts


def parts(ctx: Context) -> Parts:
    return Parts([Heading(2, "Summary"), _table(ctx)])


def _table(ctx: Context) -> Table:
    study, summary = ctx.study, ctx.summary
    if summary.empty:
        return Table(["note"], [["no completed run: nothing to average"]])
    return frame_rows(
        summary,
        [
            *key_columns(study),
            ("seeds", lambda r: str(r.n_seeds)),
            *metric_columns(study, best=True, every=True),
            ("final train loss", lambda r: fmt_pm(r.final_train_loss_mean, r.final_train_loss_std)),
            ("wall time (s)", lambda r: fmt_pm(r.wall_seconds_mean, r.wall_seconds_std)),
            ("speedup (×)", lambda r: speedup(r.speedup, r.speedup_std)),
            (
                "payload per worker",
                lambda r: NOT_APPLICABLE if int(r.workers) == 1 else fmt_bytes(r.bytes_mean, r.bytes_std),
            ),
            ("syncs", lambda r: NOT_APPLICABLE if int(r.workers) == 1 else fmt(r.syncs_mean)),
            ("samples/s", lambda r: fmt_pm(r.samples_per_second_mean, r.samples_per_second_std)),
        ],
    )
