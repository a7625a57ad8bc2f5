"""The "Training curves" section: the primary metric and the train loss against epochs and against
wall time, mean lines in ± std bands."""

from __future__ import annotations

from localsgd.report import curve_plots
from localsgd.report.render import Heading
from localsgd.report.section import Context, Drawing, Parts, Shown


def parts(ctx: Context) -> Parts:
    frame, look, metrics = ctx.curves, ctx.look, ctx.metrics
    drawings = [
        Drawing(
            "metric_vs_epochs",
            "Primary metric against epochs (mean, band ± std over seeds)",
            lambda: curve_plots.metric_vs_epochs(frame, look, metrics),
        ),
        Drawing(
            "metric_vs_wall_time",
            "Primary metric against training wall time (mean, band ± std over seeds)",
            lambda: curve_plots.metric_vs_wall_time(frame, look, metrics),
        ),
        Drawing(
            "train_loss_vs_epochs",
            "Train loss against epochs (mean, band ± std over seeds)",
            lambda: curve_plots.train_loss_vs_epochs(frame, look),
        ),
        Drawing(
            "train_loss_vs_wall_time",
            "Train loss against training wall time (mean, band ± std over seeds)",
            lambda: curve_plots.train_loss_vs_wall_time(frame, look),
        ),
    ]
    return Parts([Heading(2, "Training curves"), *(Shown(d) for d in drawings)])
