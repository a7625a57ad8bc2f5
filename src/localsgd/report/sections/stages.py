"""A study of stages: "Stages", a table per later stage (:mod:`~localsgd.report.stages`)."""

from __future__ import annotations

from localsgd.report.render import Block, Heading, Paragraph
from localsgd.report.section import Context, Parts
from localsgd.report.stages import later_stages, stage_table


def parts(ctx: Context) -> Parts:
    study = ctx.study
    blocks: list[Block] = []
    for stage in later_stages(study.plan):
        made = stage_table(study, stage)
        if made is None:
            continue
        table, notes = made
        source = stage["from_stage"]
        blocks += [
            Heading(3, f"Stage {stage['name']}, from the models of stage {source}"),
            Paragraph(
                f"One row per configuration of stage {source} (its runs: completed/planned): the final value "
                f"of its primary metric (test split) and its training wall time, then the final metrics of the "
                f"{stage['name']} runs started from its runs' exported models (completed/made; mean ± std "
                f"over all of them: their seeds, and the seeds of stage {source} if several). A run of stage "
                f"{source} that failed, diverged or exported no model has no {stage['name']} runs."
            ),
            table,
            *[Paragraph(n) for n in notes],
        ]
    return Parts([Heading(2, "Stages"), *blocks] if blocks else [])
