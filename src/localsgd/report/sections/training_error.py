"""'Training error' against epochs, where a workload evaluates it (Goyal et al.'s Figure 2)."""

from __future__ import annotations

from localsgd.report import curve_plots
from localsgd.report.render import Heading
from localsgd.report.section import Context, Drawing, Parts, Shown


def parts(ctx: Context) -> Parts:
    errors = {w: m for w, ms in ctx.study.declared.items() for m in ms if m.name == "train_error"}
    if not errors:
        return Parts()
    frame, look = ctx.curves, ctx.look
    drawing = Drawing(
        "train_error_vs_epochs",
        "Training error against epochs (mean, band ± std over seeds)",
        lambda: curve_plots.metric_vs_epochs(frame, look, errors),
    )
    return Parts([Heading(2, "Training error"), Shown(drawing)])
