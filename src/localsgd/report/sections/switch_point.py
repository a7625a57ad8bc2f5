"""When some variant sweeps its switch point t': "Switch point", post-local SGD's (and
SlowMo's, DiLoCo's) final metric against t' (:mod:`~localsgd.report.switch_plots`)."""

from __future__ import annotations

from localsgd.report import switch_plots
from localsgd.report.section import Context, Parts, one_figure

STEM = "metric_vs_switch_point"
CAPTION = (
    "Final primary metric against the switch point t' of post-local SGD, with and without an "
    "outer optimizer (mean ± std over seeds; long dashes: mini-batch SGD at the same K, band ± std)"
)
TEXT = (
    "Post-local SGD averages gradients every step (mini-batch SGD) until its switch point t', "
    "then takes H local steps between averagings; SlowMo and DiLoCo with a switch point do the "
    "same and start their outer momentum at t' from the model there. Each line is one variant "
    "and K across its switch points (mean ± std over seeds, lines dodged sideways so that their "
    "error bars stay apart); one panel per setting when the study varies one (the learning-rate "
    "schedule, say). The long-dashed line is the synchronous baseline at the same K and setting, "
    "which never switches, with its ± std band."
)


def parts(ctx: Context) -> Parts:
    frame = switch_plots.switch_frame(ctx.study)
    figure = (
        switch_plots.metric_vs_switch_point(frame, ctx.metrics) if switch_plots.has_sweep(frame) else None
    )
    return one_figure("Switch point", TEXT, STEM, CAPTION, figure)
