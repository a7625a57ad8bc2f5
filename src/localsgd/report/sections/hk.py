"""When some variant sweeps its period H at a K: "H·K", local SGD's H·K trade-off
(:mod:`~localsgd.report.hk_plots`)."""

from __future__ import annotations

from localsgd.report import hk_plots
from localsgd.report.section import Context, Parts, one_figure

TEXT = (
    "Local steps between averagings (H) times workers (K): one line per K across its periods, "
    "mean ± std over seeds, with that K's synchronous baseline (mini-batch SGD, which averages "
    "gradients every step) long-dashed in the same colour with its ± std band. If the trade-off "
    "were a function of H·K alone, the lines of different K would fall on one curve."
)
STEM = "metric_vs_hk_by_workers"
CAPTION = (
    "Final primary metric against H·K, one line per worker count K across its periods H "
    "(mean ± std over seeds; long dashes in the same colour: mini-batch SGD at that K, band ± std)"
)


def parts(ctx: Context) -> Parts:
    summary = ctx.summary
    figure = hk_plots.metric_vs_hk(summary, ctx.metrics) if hk_plots.has_sweep(summary) else None
    return one_figure("H·K", TEXT, STEM, CAPTION, figure)
