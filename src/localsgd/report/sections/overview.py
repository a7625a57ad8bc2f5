"""The report's head: title, what the store holds (study, generated when), the contents,
and the "Overview" section: workloads, runs and their outcomes, seeds, what is held fixed,
the speedup baseline, how the tables round, and the metrics each workload declared."""

from __future__ import annotations

import datetime

import pandas as pd

from localsgd.report.columns import NOT_APPLICABLE
from localsgd.report.render import Bullets, Contents, Heading, Paragraph
from localsgd.report.rounding import fmt_pm
from localsgd.report.section import Context, Parts
from localsgd.report.tables import Study, natural_key

TITLE = "localsgd study report"
FIXED = {"worker_batch": "the per-worker batch B", "global_batch": "the global batch K·B"}
ROUNDING = (
    "Tables show mean ± std over seeds (std with ddof=1) of the completed runs only; failed "
    "and diverged runs are listed in the status table. Final = the last evaluation; wall "
    "time is training time without evaluation. Rounding: the std keeps two significant "
    "digits when its first is 1 or 2, else one, and the mean is rounded to the same place; "
    "a value without ± (one seed, or all seeds equal) keeps four significant digits. "
    f"{NOT_APPLICABLE} marks a figure that does not apply (a single worker communicates "
    "nothing)."
)


def parts(ctx: Context) -> Parts:
    study = ctx.study
    return Parts(
        [
            Heading(1, TITLE),
            Paragraph(_intro(study)),
            Contents(),
            Heading(2, "Overview"),
            Bullets(_lines(study, ctx.status, ctx.baseline)),
            Bullets(_metric_lines(study)),
        ]
    )


def _intro(study: Study) -> str:
    plan = study.plan
    generated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    intro = []
    if plan.get("study"):
        description = str(plan.get("description") or "").strip()
        if description and description[-1] not in ".!?":
            description += "."
        intro.append(f"Study `{plan['study']}`" + (f": {description}" if description else "."))
    intro.append(f"Store `{study.root}`, generated {generated}.")
    return " ".join(intro)


def _lines(study: Study, status: pd.DataFrame, baseline: pd.DataFrame) -> list[str]:
    runs = study.runs
    counts = runs["status"].value_counts()
    workloads = sorted(runs["workload"].unique(), key=natural_key)
    seeds = sorted(runs["seed"].dropna().unique())
    fixed = sorted({str(v) for v in runs.get("config.fixed", pd.Series(dtype=object)).dropna()})
    return [
        f"Workload{'s' if len(workloads) > 1 else ''}: {', '.join(workloads)}.",
        f"{len(runs)} finished runs: "
        + ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("completed", "failed", "diverged"))
        + f", in {status.shape[0]} configurations "
        f"({runs['variant'].nunique()} variants, K ∈ "
        f"{{{', '.join(str(k) for k in sorted(runs['workers'].unique()))}}}).",
        *_pending(study),
        f"Seeds: {', '.join(str(s) for s in seeds)}.",
        *([f"Held fixed when K varies: {', '.join(FIXED.get(f, f) for f in fixed)}."] if fixed else []),
        *_baseline_lines(baseline),
        ROUNDING,
        *_simulated(study),
    ]


def _pending(study: Study) -> list[str]:
    """A line on the planned runs not finished yet, when the plan lists its runs."""
    planned = study.plan.get("runs")
    if not isinstance(planned, list):
        return []
    done = set(study.runs["run_id"])
    missing = sum(1 for r in planned if isinstance(r, dict) and r.get("run_id") not in done)
    return [f"{missing} of the {len(planned)} planned runs have not finished yet."] if missing else []


def _simulated(study: Study) -> list[str]:
    """Why the wall times of a simulating engine are no K-worker times."""
    runs = study.runs
    simulated = sorted(set(runs.loc[~runs["real_wall_time"].astype(bool), "engine_name"]))
    if not simulated:
        return []
    return [
        "Runs of an engine that computes all K workers in one process ("
        + ", ".join(f"`{e}`" for e in simulated)
        + "): their wall time and speedup measure the simulation on this machine, "
        "not K workers; `localsgd report --cluster NAME` estimates the time on a cluster."
    ]


def _baseline_lines(baseline: pd.DataFrame) -> list[str]:
    lines = []
    for row in baseline.to_dict("records"):
        where = str(row["workload"]) + (f" [{row['setting']}]" if row.get("setting") else "")
        if row["runs"]:
            lines.append(
                f"Speedup baseline for {where}: the {row['runs']} completed K=1 run(s) "
                f"({row['variants']}; seeds {row['seeds']}), mean wall time "
                f"{fmt_pm(row['wall_seconds_mean'], row['wall_seconds_std'])} s. "
                "Speedup = that mean / a configuration's mean wall time."
            )
        else:
            lines.append(f"Speedup baseline for {where}: none (no completed K=1 run); speedup is blank.")
    return lines


def _metric_lines(study: Study) -> list[str]:
    lines = []
    for workload in sorted(study.declared, key=natural_key):
        declared = study.declared[workload]
        primary = study.primary(workload)
        described = ", ".join(
            f"{m.heading}, {'higher' if m.higher_is_better else 'lower'} is better" for m in declared
        )
        lines.append(
            f"Metrics of {workload} (of the consensus model at each evaluation): {described}; "
            f"primary: {primary.title if primary else 'none'}."
        )
    return lines
