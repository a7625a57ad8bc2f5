"""The headline: the primary metric against speedup over one worker, its Pareto front, and
with training subsets the same per workload and subset (workbook sheet ``by_subset``)."""

from __future__ import annotations

from localsgd.report import plots, subsets, workbook
from localsgd.report.render import Heading, Paragraph
from localsgd.report.section import Context, Drawing, Part, Parts, Shown

TEXT = (
    "Speedup = the mean wall time of the K=1 baseline / a configuration's mean wall time; its "
    "± propagates the spread of both wall times, speedup · sqrt((σ₁/T₁)² + (σ/T)²) (σ the std "
    "over seeds), and is drawn as horizontal error bars. Each algorithm family has one colour "
    "in every figure; when markers would hide one another, the figure has one panel per family "
    "with the other points in grey. A configuration far below (above) the others is drawn at "
    "the edge of the axis with its value, so that it does not squeeze the rest."
)


def parts(ctx: Context) -> Parts:
    summary, look, metrics = ctx.summary, ctx.look, ctx.metrics
    pareto = Drawing(
        "pareto_speedup",
        "Pareto front: final primary metric against speedup over one worker (mean ± std over "
        "seeds on both axes; the dashed staircase joins the configurations no other beats on both)",
        lambda: plots.pareto_speedup(summary, look, metrics),
    )
    against = Drawing(
        "metric_vs_speedup",
        "Final primary metric against speedup over one worker (mean ± std over seeds on both axes)",
        lambda: plots.metric_vs_speedup(summary, look, metrics),
    )
    blocks: list[Part] = [
        Heading(2, "Primary metric against speedup"),
        Paragraph(TEXT),
        Shown(pareto),
        Shown(against),
    ]
    if not subsets.has_subsets(ctx.study):
        return Parts(blocks)
    split = subsets.by_subset(ctx.study, summary)
    by_subset = Drawing(
        "metric_vs_speedup_by_subset",
        "The same, one panel per workload and training subset (workbook sheet by_subset)",
        lambda: subsets.metric_vs_speedup_by_subset(split, look, metrics),
    )
    return Parts(
        [*blocks, Shown(by_subset)],
        {"by_subset": workbook.Sheet(subsets.sheet(split, metrics), "group")},
    )
