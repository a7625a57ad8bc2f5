"""The report's sections, in the order the report shows them: one module each, with a
``parts(ctx)`` function (:mod:`localsgd.report.section`). A new section is one module and
its line in :data:`SECTIONS`. A section that does not apply to the study returns nothing.
Sheets go into the workbook in the same order (``data``'s first)."""

from __future__ import annotations

from localsgd.report.section import Section
from localsgd.report.sections import (
    asynchrony,
    cluster,
    communication,
    curves,
    data,
    files,
    hk,
    measured,
    overview,
    speedup,
    stages,
    status,
    steps_to_result,
    summary,
    switch_point,
    tradeoffs,
    training_error,
)

SECTIONS: tuple[Section, ...] = (
    data,  # sheets only: summary, status, baseline, runs, metrics
    overview,  # title, contents, what the store holds, the baseline, the rounding rule
    speedup,  # primary metric against speedup, its Pareto front (per training subset)
    summary,
    curves,  # primary metric and train loss against epochs and wall time
    communication,  # against bytes and H·K
    cluster,  # --cluster: estimated times, time to target
    tradeoffs,  # streaming or compression varied: accuracy against bytes and estimated time
    training_error,  # workloads that evaluate it
    steps_to_result,  # --target or the study's target
    stages,  # studies of stages
    measured,  # --cluster: runs of worker processes, measured beside estimated
    asynchrony,  # asynchronous runs
    hk,  # a sweep of H
    switch_point,  # a sweep of t'
    status,
    files,  # links to the workbook and to every figure file
)
