"""The "Communication" section: the final primary metric against the bytes each worker sent, and
against H·K (synchronisation period times workers)."""

from __future__ import annotations

from localsgd.report import plots
from localsgd.report.render import Heading, Paragraph
from localsgd.report.section import Context, Drawing, Parts, Shown


def parts(ctx: Context) -> Parts:
    summary, look, metrics = ctx.summary, ctx.look, ctx.metrics
    runs = ctx.study.runs
    without_period = sorted(set(runs.loc[runs["period"].isna(), "algorithm"]))
    return Parts(
        [
            Heading(2, "Communication"),
            Shown(
                Drawing(
                    "metric_vs_bytes",
                    "Final primary metric against communication volume (mean ± std over seeds)",
                    lambda: plots.metric_vs_bytes(summary, look, metrics),
                )
            ),
            Paragraph(
                "H·K: H is each algorithm's synchronisation period (its `sync_period`: local steps "
                "between two averagings; hierarchical local SGD: between block averagings), K the "
                "workers; algorithms that synchronise every step count as H = 1, and those without a "
                "comparable period"
                + (f" ({', '.join(without_period)})" if without_period else "")
                + " are left out, as are K=1 runs. Points at the same H·K are spread sideways so that "
                "none hides another."
            ),
            Shown(
                Drawing(
                    "metric_vs_period_workers",
                    "Final primary metric against H·K (mean ± std over seeds; long dashes: mini-batch "
                    "SGD at each K)",
                    lambda: plots.metric_vs_period_workers(summary, look, metrics),
                )
            ),
        ]
    )
