"""When a study varies how a sync travels -- streaming's fragments F, overlap τ and mixing
ω (``fragments``, ``overlap``, ``mixing``) or what crosses the wire (``compression``) --
"Accuracy against cost": the final primary metric against the bytes each worker sent and
against the estimated training time on a slow cluster, each with its Pareto front, and a
table of every configuration saying whether it is on either front; workbook sheet
``tradeoffs``.

The estimated time is the ``--cluster`` estimate when the report has one; otherwise this
section estimates on :data:`SLOW_CLUSTER` itself, because what streaming and compression
buy shows on a slow link, not on the machine that ran the study.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from localsgd.costmodel import Cluster, load_cluster
from localsgd.report import plots, workbook
from localsgd.report.columns import NOT_APPLICABLE, key_columns
from localsgd.report.estimates import estimate
from localsgd.report.graphics import Metrics
from localsgd.report.render import Heading, Paragraph, Table, frame_rows
from localsgd.report.rounding import fmt_bytes, fmt_pm
from localsgd.report.section import Context, Drawing, Parts, Shown

SLOW_CLUSTER = "wan"
"""The preset this section estimates on without ``--cluster``: 1 Gb/s, 50 ms latency."""

STREAMING_KEYS = ("config.algorithm.fragments", "config.algorithm.overlap", "config.algorithm.mixing")
"""Flattened config columns of streaming's F, τ and ω."""
COMPRESSION_PREFIX = "config.algorithm.compression"
"""Flattened config columns of a codec (``compression.codec``, ``.error_feedback``, ...)."""

BYTES_FRONT = "front_bytes"
TIME_FRONT = "front_time"


def varied_keys(runs: pd.DataFrame) -> list[str]:
    """The streaming and compression config columns that take more than one value across
    the runs (a run without the key has its default, which counts as a value of its own)."""
    keys = [c for c in runs.columns if c in STREAMING_KEYS or str(c).startswith(COMPRESSION_PREFIX)]
    return [k for k in keys if runs[k].map(_value).nunique() > 1]


def _value(v: Any) -> str:
    return "default" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(v)


def fronts(summary: pd.DataFrame, metrics: Metrics, x: str, x_higher: bool) -> list[bool | None]:
    """Per summary row, whether its mean is on its workload's Pareto front of the primary
    metric against column ``x`` (None where the row has no finite, positive x: it is not
    drawn either)."""
    out: list[bool | None] = [None] * len(summary)
    rows = summary.reset_index(drop=True)
    for workload, part in rows.groupby("workload", sort=False):
        metric = metrics.get(str(workload))
        if metric is None:
            continue
        ys = part[f"final_{metric.name}_mean"].astype(float)
        xs = part[x].astype(float)
        drawn = [i for i in part.index if math.isfinite(xs[i]) and xs[i] > 0 and math.isfinite(ys[i])]
        best = plots.pareto_front(
            [xs[i] for i in drawn], [ys[i] for i in drawn], x_higher, metric.higher_is_better
        )
        for i, on in zip(drawn, best):
            out[i] = on
    return out


LOG_SPAN = 4.0
"""The time axis is logarithmic when its largest value is at least this many times its
smallest: a narrower span (every run's time within a few percent) gets a linear axis."""


def _log(values: pd.Series) -> int | None:
    finite = [float(v) for v in values if math.isfinite(float(v)) and float(v) > 0]
    return 10 if finite and max(finite) >= LOG_SPAN * min(finite) else None


BYTES_AXIS = plots.XAxis(
    "bytes_mean",
    "bytes_std",
    "bytes sent per worker over the run (log scale; kB = 1000 B)",
    log=10,
    bytes=True,
    higher_is_better=False,
)


def _time_axis(drawn: pd.DataFrame, cluster: str) -> plots.XAxis:
    log = _log(drawn["est_total_seconds_mean"])
    return plots.XAxis(
        "est_total_seconds_mean",
        "est_total_seconds_std",
        f"estimated training time on {cluster} (s{', log scale' if log else ''}; compute + communication)",
        log=log,
        higher_is_better=False,
    )


def _estimated(ctx: Context) -> tuple[Cluster, pd.DataFrame]:
    """The cluster and the summary with its estimated times: the report's own estimates,
    else this section's on :data:`SLOW_CLUSTER`."""
    if ctx.estimates is not None:
        return ctx.estimates.cluster, ctx.summary
    cluster = load_cluster(SLOW_CLUSTER)
    return cluster, estimate(ctx.study, ctx.summary, cluster, None, ctx.select).summary


def parts(ctx: Context) -> Parts:
    varied = varied_keys(ctx.study.runs)
    if not varied or ctx.summary.empty:
        return Parts()
    cluster, summary = _estimated(ctx)
    # The fronts compare ways of synchronising K > 1 workers; one worker is the reference.
    many = summary["workers"].astype(int) > 1
    summary = summary.assign(**{BYTES_FRONT: None, TIME_FRONT: None})
    summary.loc[many, BYTES_FRONT] = fronts(summary[many], ctx.metrics, "bytes_mean", False)
    summary.loc[many, TIME_FRONT] = fronts(summary[many], ctx.metrics, "est_total_seconds_mean", False)
    drawn = summary[many]
    look, metrics, name = ctx.look, ctx.metrics, cluster.name
    by_bytes = Drawing(
        "tradeoff_bytes",
        "Pareto front: final primary metric against bytes sent per worker (mean ± std over seeds)",
        lambda: plots.pareto(
            drawn,
            look,
            metrics,
            BYTES_AXIS,
            title="Pareto front: final {metric} against bytes sent per worker",
            why_empty="no run communicated (only K=1 runs)",
        ),
    )
    by_time = Drawing(
        "tradeoff_est_time",
        f"Pareto front: final primary metric against estimated training time on {name} "
        "(mean ± std over seeds on both axes)",
        lambda: plots.pareto(
            drawn,
            look,
            metrics,
            _time_axis(drawn, name),
            title=f"Pareto front: final {{metric}} against estimated time on {name}",
            why_empty="no run of K>1 workers with an estimated time",
        ),
    )
    return Parts(
        [
            Heading(2, "Accuracy against cost"),
            Paragraph(_text(varied, cluster)),
            Shown(by_bytes),
            Shown(by_time),
            _table(ctx, summary, name),
        ],
        {"tradeoffs": workbook.Sheet(_sheet(ctx, summary), "variant")},
    )


def _text(varied: Sequence[str], cluster: Cluster) -> str:
    names = ", ".join(f"`{k.removeprefix('config.algorithm.')}`" for k in varied)
    return (
        f"The study varies {names}: what each configuration pays in accuracy for what it saves "
        "in bytes (as counted by the run: payload, scales and indices) and in estimated time on "
        f"cluster `{cluster.name}`"
        + (f" ({cluster.description})" if cluster.description else "")
        + ", the cost model's estimate from each run's own counters, with a streamed fragment's "
        "transfer hidden behind its τ steps of compute where the run overlaps. A configuration is "
        "on a front when no other is at least as accurate and at least as cheap, and better on "
        "one (means over seeds), among the runs of K > 1 workers; the fronts' staircases are "
        "dashed and the dominated points faded. One worker, which sends nothing, is in the table "
        "as the reference and in neither figure."
    )


def _mark(on: Any) -> str:
    return (
        NOT_APPLICABLE
        if on is None or (isinstance(on, float) and math.isnan(on))
        else ("yes" if on else "no")
    )


def _table(ctx: Context, summary: pd.DataFrame, cluster: str) -> Table:
    study = ctx.study
    primaries = [m for m in study.metric_list() if m.name in set(study.primaries.values())]
    metric_cells = [
        (
            f"final {m.heading}",
            lambda r, m=m: fmt_pm(
                getattr(r, f"final_{m.name}_mean"), getattr(r, f"final_{m.name}_std"), m.scale
            ),
        )
        for m in primaries
    ]
    return frame_rows(
        summary,
        [
            *key_columns(study),
            ("seeds", lambda r: str(r.n_seeds)),
            *metric_cells,
            (
                "bytes per worker",
                lambda r: NOT_APPLICABLE if int(r.workers) == 1 else fmt_bytes(r.bytes_mean, r.bytes_std),
            ),
            (
                f"est. time on {cluster} (s)",
                lambda r: fmt_pm(r.est_total_seconds_mean, r.est_total_seconds_std),
            ),
            ("front: bytes", lambda r: _mark(getattr(r, BYTES_FRONT))),
            ("front: time", lambda r: _mark(getattr(r, TIME_FRONT))),
        ],
    )


def _sheet(ctx: Context, summary: pd.DataFrame) -> pd.DataFrame:
    metric_columns = [
        f"final_{m.name}_{s}"
        for m in ctx.study.metric_list()
        if m.name in set(ctx.study.primaries.values())
        for s in ("mean", "std")
    ]
    columns = [
        "workload",
        "variant",
        "workers",
        "n_seeds",
        *metric_columns,
        "bytes_mean",
        "bytes_std",
        "est_total_seconds_mean",
        "est_total_seconds_std",
        BYTES_FRONT,
        TIME_FRONT,
    ]
    sheet = summary[[c for c in columns if c in summary.columns]].copy()
    for column in (BYTES_FRONT, TIME_FRONT):
        sheet[column] = [None if (m := _mark(on)) == NOT_APPLICABLE else m for on in sheet[column]]
    return sheet
