"""With ``--cluster``: "Measured against estimated on NAME": runs of real worker processes
beside the cost model's estimate (:mod:`~localsgd.report.measured`)."""

from __future__ import annotations

from localsgd.report import graphics, measured
from localsgd.report.render import Heading, Paragraph, Table
from localsgd.report.rounding import fmt, fmt_pm
from localsgd.report.section import Context, Drawing, Parts, Shown

HEADERS = [
    "workload",
    "configuration",
    "seeds",
    "measured s",
    "estimated s",
    "measured / estimated",
    "measured comm s",
    "estimated comm s",
    "comm: measured / estimated",
]


def parts(ctx: Context) -> Parts:
    """Nothing without a cluster, or when the study has no completed multi-worker run with a
    real wall time."""
    if ctx.estimates is None:
        return Parts()
    frame = measured.groups(ctx.estimates)
    if frame.empty:
        return Parts()
    name, look = ctx.estimates.cluster.name, ctx.look
    caption = f"Measured against estimated training time on {name}"
    drawing = Drawing(
        "measured_vs_estimated", caption, lambda: graphics.Plot(measured.plot(frame, name, look)), caption
    )
    rows = [
        [
            str(r.workload),
            str(r.group),
            str(r.seeds),
            fmt_pm(r.measured_total_mean, r.measured_total_std),
            fmt_pm(r.est_total_mean, r.est_total_std),
            fmt_pm(r.ratio_mean, r.ratio_std),
            fmt_pm(r.measured_comm_mean, r.measured_comm_std),
            fmt(r.est_comm_mean),
            fmt_pm(r.comm_ratio_mean, r.comm_ratio_std),
        ]
        for r in frame.itertuples(index=False)
    ]
    return Parts(
        [
            Heading(2, f"Measured against estimated on {name}"),
            Paragraph(
                "Training wall time of the runs of worker processes (mean ± std over seeds) beside the "
                f"cost model's estimate on `{name}`: compute as measured in each run, communication from "
                "the run's per-scope counters (collectives, payload bytes) on the cluster's links, plus "
                "any injected delay (`comm.delay`, seconds per collective of its scope). Measured "
                "communication is the time spent inside collectives, waiting for slower peers included."
            ),
            Shown(drawing),
            Table(HEADERS, rows),
        ]
    )
