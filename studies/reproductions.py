"""The source studies' findings beside this project's measurements (docs/reproductions.md).

Reads the stores the studies named in docs/reproductions.md write (by default under
``studies_out/``) and prints, per claim, the numbers measured here: mean ± std over the
seeds of each configuration, from the runs' final evaluations on the test split (targets,
steps-to-result and their trials selected on the validation split). A study whose store is
missing is listed with the command that produces it.

    python studies/reproductions.py [--stores studies_out] [--cluster 10gbe]

Every number docs/reproductions.md quotes is a line of this script's output.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from localsgd.costmodel import load_cluster
from localsgd.report.estimates import estimate
from localsgd.report.selection import selection
from localsgd.report.steps import goals, steps_table
from localsgd.report.tables import Study, load, natural_key, summary_table

COMMANDS = {
    "warmup": "localsgd study studies/warmup.toml",
    "batch_size_small": "localsgd study studies/batch_size_small.toml",
    "scaling_small": "localsgd study studies/scaling_small.toml",
    "lin2020_mnist1d": "localsgd study studies/lin2020_mnist1d.toml",
    "demo": "make demo",
    "glue_tiny": "localsgd fixtures studies_out/fixtures && localsgd study studies/glue_tiny.toml",
    "stilt_tiny": "localsgd fixtures studies_out/fixtures && localsgd study studies/stilt_tiny.toml",
}


def by_switch(variant: str) -> tuple[float, str]:
    """Variants in the order of their switch point t' (``post_local_sgd t'=0.8ep H=16``)."""
    match = re.search(r"t'=([0-9.]+)ep", variant)
    return (float(match.group(1)) if match else -1.0, variant)


def pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    """``97.1 ± 0.2`` (a fraction shown in percent by default)."""
    if not math.isfinite(mean):
        return "n/a"
    if not math.isfinite(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


@dataclass
class Groups:
    """A store's summary table (one row per configuration, mean and std over seeds)."""

    study: Study
    table: pd.DataFrame

    def find(self, variant: str | None = None, workers: int | None = None, **where: Any) -> pd.DataFrame:
        rows = self.table
        if variant is not None:
            rows = rows[rows["variant"] == variant]
        if workers is not None:
            rows = rows[rows["workers"] == workers]
        for key, value in where.items():
            if key == "setting":
                rows = rows[rows["setting"].astype(str).str.contains(str(value), regex=False)]
            else:
                rows = rows[rows[key] == value]
        return rows

    def one(self, variant: str | None = None, workers: int | None = None, **where: Any) -> dict[str, Any]:
        rows = self.find(variant, workers, **where)
        if len(rows) != 1:
            raise LookupError(f"{len(rows)} configurations match {variant} K={workers} {where}")
        return rows.iloc[0].to_dict()

    def acc(self, variant: str | None = None, workers: int | None = None, **where: Any) -> str:
        """Final test accuracy (%), mean ± std over seeds; ``not run`` for a configuration
        the store does not hold (yet)."""
        if self.find(variant, workers, **where).empty:
            return "not run"
        row = self.one(variant, workers, **where)
        return pm(row["final_accuracy_mean"], row["final_accuracy_std"])


def groups(root: Path) -> Groups:
    study = load(root)
    return Groups(study, summary_table(study))


Claim = tuple[str, Callable[[Groups], Iterable[str]]]


# -- Goyal et al. 2017, Table 1 (warmup.toml) ----------------------------------------------


def warmup_rows(g: Groups) -> Iterable[str]:
    def err(batch: int, setting: str) -> str:
        row = g.one(batch_size=batch, setting=setting)
        return pm(1 - row["final_accuracy_mean"], row["final_accuracy_std"])

    yield f"B = 32 (k·n = 32), lr 0.05: test error {err(32, 'warmup_epochs=0.0')} %"
    yield f"B = 512, lr 0.8, no warmup: {err(512, 'warmup=gradual, schedule.warmup_epochs=0.0')} %"
    yield f"B = 512, constant warmup (1 epoch): {err(512, 'warmup=constant')} %"
    yield f"B = 512, gradual warmup (1 epoch): {err(512, 'warmup=gradual, schedule.warmup_epochs=1.0')} %"


# -- Shallue et al. 2019 (batch_size_small.toml) -------------------------------------------


def steps_rows(g: Groups) -> Iterable[str]:
    table = steps_table(g.study, goals(g.study, None), selection(g.study))
    for (workload, curve), part in table.groupby(["workload", "curve"], sort=False):
        points = ", ".join(
            f"B={int(r.batch_size)}: "
            + (f"{r.steps:.0f}±{r.steps_std:.0f}" if math.isfinite(r.steps) else "not reached")
            + (f" ({r.regime})" if r.regime else "")
            for r in part.itertuples()
        )
        yield f"{workload} {curve} [{part['split'].iloc[0]}]: {points}"
        best = ", ".join(
            f"B={int(r.batch_size)}: lr {r.best_lr:.3g}"
            + (f", momentum {r.best_momentum:.3g}" if "momentum searched" in curve else "")
            for r in part.itertuples()
            if math.isfinite(r.steps)
        )
        yield f"{workload} {curve}: best trial {best}"


# -- Ortiz et al. 2021 (scaling_small.toml) -------------------------------------------------


def scaling_rows(g: Groups, cluster: str) -> Iterable[str]:
    step = "schedule.name=step"
    for k in (4, 16, 64):
        local = ", ".join(f"H={h}: {g.acc(f'local_sgd H={h}', k, setting=step)}" for h in (1, 2, 4, 8, 16, 32))
        yield f"K={k}: mini-batch SGD {g.acc('minibatch_sgd', k, setting=step)}; local SGD {local}"
    yield f"one worker: {g.acc('minibatch_sgd', 1, setting=step)} (step), {g.acc('minibatch_sgd', 1, setting='half_cosine')} (half-cosine)"
    for hk in (16, 64, 256):
        same = [(k, hk // k) for k in (4, 16, 64) if hk % k == 0 and hk // k in (1, 2, 4, 8, 16, 32)]
        yield f"H·K = {hk}: " + ", ".join(f"K={k} H={h}: {g.acc(f'local_sgd H={h}', k, setting=step)}" for k, h in same)
    for schedule in ("step", "half_cosine"):
        for family in ("post_local_sgd", "slowmo"):
            rows = g.find(workers=16, setting=f"schedule.name={schedule}")
            rows = rows[rows["algorithm"] == family]
            rows = rows.loc[sorted(rows.index, key=lambda i: by_switch(str(rows.at[i, "variant"])))]
            points = "; ".join(
                f"{r['variant']}: {pm(r['final_accuracy_mean'], r['final_accuracy_std'])}" for _, r in rows.iterrows()
            )
            yield f"K=16 {schedule}, {family}: {points}"
        yield f"K=16 {schedule}, mini-batch SGD: {g.acc('minibatch_sgd', 16, setting=f'schedule.name={schedule}')}"
    yield from _short_term(g)
    yield from _estimates(g, cluster)


def _short_term(g: Groups) -> Iterable[str]:
    """Post-local SGD against mini-batch SGD at K = 16 (step schedule) one epoch after each
    switch point and at the end: the test accuracy of the evaluations at those epochs."""
    study = g.study
    runs = study.runs[(study.runs["workers"] == 16) & (study.runs["status"] == "completed")]
    runs = runs[runs["config.schedule.name"] == "step"]
    metrics = study.metrics
    base = runs[runs["algorithm"] == "minibatch_sgd"]["run_id"]
    post = runs[runs["algorithm"] == "post_local_sgd"]
    for variant in sorted(set(post["variant"]), key=by_switch):
        part = post[post["variant"] == variant]
        switch = float(part["config.algorithm.switch_epoch"].iloc[0])
        if switch == 0:
            continue
        at = switch + 1.0
        ours = _accuracy_at(metrics, part["run_id"], at)
        theirs = _accuracy_at(metrics, base, at)
        yield (
            f"{variant}, one epoch after the switch (epoch {at:g}): {pm(*ours)} against mini-batch SGD "
            f"{pm(*theirs)}"
        )


def _accuracy_at(metrics: pd.DataFrame, run_ids: Iterable[str], epoch: float) -> tuple[float, float]:
    values = []
    for run_id in run_ids:
        rows = metrics[metrics["run_id"] == run_id]
        nearest = rows.iloc[(rows["epoch"] - epoch).abs().argsort()[:1]]
        values.append(float(nearest["accuracy"].iloc[0]))
    series = pd.Series(values, dtype=float)
    return float(series.mean()), float(series.std(ddof=1))


def _estimates(g: Groups, cluster: str) -> Iterable[str]:
    est = estimate(g.study, g.table, load_cluster(cluster))
    table = est.summary
    step = table["setting"].astype(str).str.contains("schedule.name=step")

    def speedup(variant: str, workers: int) -> str:
        rows = table[step & (table["variant"] == variant) & (table["workers"] == workers)]
        if rows.empty:
            return "not run"
        row = rows.iloc[0]
        return f"{row['est_speedup']:.2f}× ({row['est_total_seconds_mean']:.3g} s)"

    for k in (16, 64):
        yield (
            f"estimated on {cluster}, speedup over one worker, K={k}: mini-batch SGD {speedup('minibatch_sgd', k)}, "
            f"local SGD H=4 {speedup('local_sgd H=4', k)}, H=16 {speedup('local_sgd H=16', k)}"
        )
    rows = table[step & (table["algorithm"] == "post_local_sgd") & (table["workers"] == 16)]
    rows = rows.loc[sorted(rows.index, key=lambda i: by_switch(str(rows.at[i, "variant"])))]
    yield f"estimated on {cluster}, post-local SGD K=16: " + "; ".join(
        f"{r['variant']}: {r['est_total_seconds_mean']:.3g} s ({r['est_speedup']:.2f}×)" for _, r in rows.iterrows()
    )


# -- Lin et al. 2020 and the blog on it (lin2020_mnist1d.toml) -------------------------------


def lin_rows(g: Groups, cluster: str) -> Iterable[str]:
    a = {
        "A1 small mini-batch SGD (K=1, B=16)": g.acc("minibatch_sgd", 1),
        "A2 mini-batch SGD (K=16, B=16)": g.acc("minibatch_sgd", 16, batch_size=16),
        "A3 huge mini-batch SGD (K=16, B=64)": g.acc("minibatch_sgd", 16, batch_size=64),
        "A4 local SGD (K=16, H=4)": g.acc("local_sgd H=4", 16),
    }
    post = g.find(workers=16)
    post = post[post["algorithm"] == "post_local_sgd"].iloc[0]
    a[f"A5 {post['variant']} (K=16)"] = pm(post["final_accuracy_mean"], post["final_accuracy_std"])
    for name, value in a.items():
        yield f"{name}: {value}"
    est = estimate(g.study, g.table, load_cluster(cluster)).summary
    hier = est[est["algorithm"] == "hierarchical_local_sgd"]
    order = sorted(hier.index, key=lambda i: (natural_key(str(hier.at[i, "setting"])), natural_key(str(hier.at[i, "variant"]))))
    for _, row in hier.loc[order].iterrows():
        yield (
            f"{row['variant']} K=4 [{row['setting']}]: {pm(row['final_accuracy_mean'], row['final_accuracy_std'])}; "
            f"estimated on {cluster} {row['est_total_seconds_mean']:.4g} s"
        )
    for label, variant, workers, batch in (("A2", "minibatch_sgd", 16, 16), ("A4", "local_sgd H=4", 16, 16)):
        row = est[(est["variant"] == variant) & (est["workers"] == workers) & (est["batch_size"] == batch)].iloc[0]
        yield f"{label} estimated on {cluster}: speedup over one worker {row['est_speedup']:.2f}×"
    row = est[(est["algorithm"] == "post_local_sgd")].iloc[0]
    yield f"A5 estimated on {cluster}: speedup over one worker {row['est_speedup']:.2f}×"


# -- Crossbow's SMA (demo.toml) -----------------------------------------------------------


def sma_rows(g: Groups) -> Iterable[str]:
    study = g.study
    for family in ("minibatch_sgd", "sma"):
        row = g.one(workers=4, algorithm=family)
        ids = study.runs[(study.runs["algorithm"] == family) & (study.runs["workers"] == 4)]["run_id"]
        firsts = []
        for run_id in ids:
            rows = study.metrics[study.metrics["run_id"] == run_id].sort_values("step")
            hit = rows[rows["validation_accuracy"] > 0.95]
            firsts.append(float(hit["epoch"].iloc[0]) if len(hit) else math.nan)
        epochs = pd.Series(firsts, dtype=float)
        reached = int(epochs.notna().sum())
        yield (
            f"K=4 {row['variant']}: final {pm(row['final_accuracy_mean'], row['final_accuracy_std'])} %, "
            f"epochs to 95 % validation accuracy {epochs.mean():.2f} ± {epochs.std(ddof=1):.2f} "
            f"({reached} of {len(epochs)} seeds reached it), wall {row['wall_seconds_mean']:.3g} ± "
            f"{row['wall_seconds_std']:.2g} s"
        )


# -- seed 000: MNLI and SQuAD through accelerate (glue_tiny.toml) ----------------------------


def glue_rows(g: Groups) -> Iterable[str]:
    table = g.table
    for workload, metric in (("mnli", "accuracy_matched"), ("squad", "f1")):
        part = table[table["workload"] == workload]
        for _, row in part.sort_values(["setting", "workers", "variant"]).iterrows():
            yield (
                f"{workload} [{row['setting']}] {row['variant']} K={row['workers']}: "
                f"{pm(row[f'final_{metric}_mean'], row[f'final_{metric}_std'])} %, "
                f"speedup {row['speedup']:.2f}"
            )


# -- seed 001: asynchronous and synchronous continued pretraining (stilt_tiny.toml) -----------


def stilt_rows(g: Groups) -> Iterable[str]:
    from localsgd.report import stages

    for block in stages.section(g.study):
        rows = getattr(block, "rows", None)
        header = getattr(block, "headers", None)
        if rows and header:
            yield " | ".join(header)
            for row in rows:
                yield " | ".join(str(c) for c in row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", type=Path, default=Path("studies_out"), help="where the studies' stores are")
    parser.add_argument("--cluster", default="10gbe", help="the cost model's cluster for estimated times")
    args = parser.parse_args(argv)
    sections: list[tuple[str, str, Callable[[Groups], Iterable[str]]]] = [
        ("Goyal et al. 2017, Table 1", "warmup", warmup_rows),
        ("Shallue et al. 2019", "batch_size_small", steps_rows),
        ("Ortiz et al. 2021", "scaling_small", lambda g: scaling_rows(g, args.cluster)),
        ("Lin et al. 2020 and the blog", "lin2020_mnist1d", lambda g: lin_rows(g, args.cluster)),
        ("Crossbow's SMA", "demo", sma_rows),
        ("Seed 000: MNLI and SQuAD", "glue_tiny", glue_rows),
        ("Seed 001: continued pretraining", "stilt_tiny", stilt_rows),
    ]
    for title, name, rows in sections:
        print(f"## {title} ({name})")
        root = args.stores / name
        if not (root / "index.sqlite").is_file():
            print(f"- not run: no store at {root}; run `{COMMANDS[name]}`")
            continue
        for line in rows(groups(root)):
            print(f"- {line}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
