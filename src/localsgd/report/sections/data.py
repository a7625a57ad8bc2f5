"""The study's own workbook sheets, first in the workbook: summary, status, baseline, runs
(each run's config, the fields that apply to it) and metrics (every evaluation row). No
text: the summary and status sections show the first two."""

from __future__ import annotations

from localsgd.report import workbook
from localsgd.report.section import Context, Parts


def parts(ctx: Context) -> Parts:
    study = ctx.study
    return Parts(
        sheets={
            "summary": workbook.Sheet(ctx.summary, "variant"),
            "status": workbook.Sheet(ctx.status, "variant"),
            "baseline": workbook.Sheet(ctx.baseline, "workload"),
            "runs": workbook.Sheet(workbook.runs_sheet(study.runs), "run_id"),
            "metrics": workbook.Sheet(workbook.metrics_sheet(study.metrics, study.runs), "run_id"),
        }
    )
