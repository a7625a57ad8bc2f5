"""The "Run status" section: per configuration its completed, failed and diverged runs, and each
failed run's error (the last line of its traceback)."""

from __future__ import annotations

from typing import Any

from localsgd.report.columns import key_columns
from localsgd.report.render import Heading, Table, frame_rows, short_error
from localsgd.report.section import Context, Parts


def parts(ctx: Context) -> Parts:
    return Parts([Heading(2, "Run status"), _table(ctx)])


def _table(ctx: Context) -> Table:
    runs = ctx.study.runs

    def errors(row: Any) -> str:
        same = (runs["workload"] == row.workload) & (runs["group"] == row.group)
        bad = runs[same & (runs["status"] != "completed")]
        return "\n".join(
            f"seed {r.seed} ({r.status}): {short_error(str(r.error or 'no error recorded'))}"
            for r in bad.itertuples(index=False)
        )

    return frame_rows(
        ctx.status,
        [
            *key_columns(ctx.study),
            ("completed", lambda r: str(r.completed)),
            ("failed", lambda r: str(r.failed)),
            ("diverged", lambda r: str(r.diverged)),
            ("errors (last line)", errors),
        ],
    )
