"""When some run was asynchronous (a parameter server, or several Hogwild processes on one
model): "Asynchronous training": updates and their rate, a server's staleness and lost
workers, and their figures (:mod:`~localsgd.report.asynchrony`)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from localsgd.report import asynchrony, graphics
from localsgd.report.render import Block, Heading, Paragraph, Table
from localsgd.report.rounding import fmt, fmt_pm
from localsgd.report.section import Context, Drawing, Parts, Shown

TEXT = (
    "Updates: the updates the evaluated model received by the last evaluation (one per step "
    "for synchronous algorithms, every process's step under Hogwild, the server's updates under "
    "a parameter server), and per second of training (mean ± std over seeds). A push's staleness τ "
    "is the number of updates applied between the model its worker started from and the push "
    "(pooled over seeds; p50 and p90 are quantiles); lost workers died during the run, which went "
    "on without them. Virtual time: simulated runs with worker speeds, in steps of a worker of "
    "speed 1 (asynchronous: when the last worker finished; synchronous: every step waiting for "
    "the slowest)."
)


def parts(ctx: Context) -> Parts:
    frame = asynchrony.runs_frame(ctx.study)
    if not asynchrony.asynchronous(frame):
        return Parts()
    summary = asynchrony.groups(frame)
    has_server = bool(summary["histogram"].map(bool).any())
    blocks: list[Block | Shown] = [Heading(2, "Asynchronous training"), Paragraph(TEXT), _table(summary)]
    # Drawn here: whether the section shows the figure depends on there being one.
    updates = asynchrony.updates_plot(ctx.study, list(summary["group"]))
    if updates is not None:
        blocks.append(
            Shown(
                Drawing.made(
                    "metric_vs_updates",
                    "Primary metric against updates of the evaluated model (mean over seeds)",
                    updates,
                )
            )
        )
    if has_server:
        caption = "Staleness distribution of the pushes (cumulative, pooled over seeds)"
        staleness = Drawing(
            "staleness_distribution",
            caption,
            lambda: graphics.Plot(asynchrony.staleness_plot(summary)),
            listed_as=caption,
        )
        blocks.append(Shown(staleness))
    return Parts(blocks)


def _table(summary: pd.DataFrame) -> Table:
    has_server = bool(summary["histogram"].map(bool).any())
    has_time = bool(summary["virtual_time"].notna().any())
    headers = ["workload", "configuration", "seeds", "updates", "updates/s"]
    if has_server:
        headers += ["pushes", "staleness mean", "p50", "p90", "max", "lost workers"]
    if has_time:
        headers.append("virtual time")
    return Table(headers, [_row(r, has_server, has_time) for r in summary.itertuples(index=False)])


def _row(r: Any, has_server: bool, has_time: bool) -> list[str]:
    cells = [str(r.workload), str(r.group), str(r.seeds), fmt(r.updates), fmt_pm(r.ups_mean, r.ups_std)]
    if has_server:
        cells += [
            fmt(r.pushes),
            fmt(r.staleness_mean),
            fmt(r.staleness_p50),
            fmt(r.staleness_p90),
            fmt(r.staleness_max),
            str(r.lost) if r.histogram else "",
        ]
    if has_time:
        cells.append(fmt(r.virtual_time))
    return cells
