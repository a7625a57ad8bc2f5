"""``make_report``: a store in, tables, plots, report.md, report.html and results.xlsx out."""

from __future__ import annotations

import datetime
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from localsgd.costmodel import GBIT, Cluster, load_cluster
from localsgd.records import Metric
from localsgd.report import measured, plots, subsets
from localsgd.report.estimates import ClusterEstimates, estimate, parse_target
from localsgd.report.render import (
    Block,
    Bullets,
    Heading,
    Image,
    Paragraph,
    Table,
    fmt,
    fmt_bytes,
    fmt_pm,
    frame_rows,
    short_error,
    to_html,
    to_markdown,
    write_xlsx,
)
from localsgd.report.tables import (
    Study,
    baseline_table,
    curves,
    load,
    natural_key,
    status_table,
    summary_table,
)
from localsgd.util.files import write_atomic

log = logging.getLogger(__name__)

TITLE = "localsgd study report"

# (file stem, caption) in the order they appear in the report.
PLOTS = {
    "metric_vs_speedup": "Final primary metric against speedup over one worker (mean ± std over seeds)",
    "metric_vs_speedup_by_subset": "The same, one panel per workload and training subset "
    "(workbook sheet by_subset)",
    "metric_vs_epochs": "Primary metric against epochs (mean over seeds)",
    "metric_vs_wall_time": "Primary metric against training wall time (mean over seeds)",
    "train_loss_vs_epochs": "Train loss against epochs (mean over seeds)",
    "train_loss_vs_wall_time": "Train loss against training wall time (mean over seeds)",
    "metric_vs_bytes": "Final primary metric against communication volume (mean ± std over seeds)",
    "metric_vs_period_workers": "Final primary metric against H·K (mean ± std over seeds)",
}
# Added with a cluster (``--cluster``).
CLUSTER_PLOTS = {
    "metric_vs_est_speedup": "Final primary metric against estimated speedup over one worker on the cluster "
    "(mean ± std over seeds)",
    "metric_vs_est_time": "Primary metric against estimated training time on the cluster (mean over seeds)",
}


def make_report(
    store_dir: str | Path,
    out_dir: str | Path | None = None,
    cluster: Cluster | str | Path | None = None,
    target: str | None = None,
) -> dict[str, Path]:
    """Write the report of the store at ``store_dir`` into ``out_dir`` (default
    ``STORE/report``) and return the paths written, by kind.

    With ``cluster`` (a :class:`~localsgd.costmodel.Cluster`, a preset name or a cluster
    TOML path), the report adds wall-clock estimates on that cluster: summary columns,
    time to ``target`` (``"METRIC=VALUE"`` or a value of the primary metric; default: the
    best mean final value of each workload's primary metric, 5 % short of it), and two
    plots. Reads only the store. Each file is written to a temporary
    name and renamed into place; the PNGs and the workbook come before the documents that
    refer to them. ``ValueError`` when ``store_dir`` is not a store or has no finished run,
    for an unknown cluster, or a malformed target.
    """
    goal = parse_target(target)
    if goal is not None and cluster is None:
        raise ValueError("--target needs --cluster: it sets the time-to-target of the estimates")
    resolved = cluster if isinstance(cluster, Cluster) or cluster is None else load_cluster(cluster)
    study = load(store_dir)
    out = Path(out_dir) if out_dir is not None else study.root / "report"

    summary = summary_table(study)
    estimates: ClusterEstimates | None = None
    if resolved is not None:
        estimates = estimate(study, summary, resolved, goal)
        study, summary = estimates.study, estimates.summary
    out.mkdir(parents=True, exist_ok=True)
    status = status_table(study)
    baseline = baseline_table(study)
    curve_frame = curves(study)
    look = plots.styles(summary)
    metrics = {w: m for w in study.declared if (m := study.primary(w)) is not None}

    figures: dict[str, Callable[[], bytes]] = {
        "metric_vs_speedup": lambda: plots.metric_vs_speedup(summary, look, metrics),
        "metric_vs_epochs": lambda: plots.metric_vs_epochs(curve_frame, look, metrics),
        "metric_vs_wall_time": lambda: plots.metric_vs_wall_time(curve_frame, look, metrics),
        "train_loss_vs_epochs": lambda: plots.train_loss_vs_epochs(curve_frame, look),
        "train_loss_vs_wall_time": lambda: plots.train_loss_vs_wall_time(curve_frame, look),
        "metric_vs_bytes": lambda: plots.metric_vs_bytes(summary, look, metrics),
        "metric_vs_period_workers": lambda: plots.metric_vs_period_workers(summary, look, metrics),
    }
    if resolved is not None:
        name = resolved.name
        figures["metric_vs_est_speedup"] = lambda: plots.metric_vs_est_speedup(summary, look, metrics, name)
        figures["metric_vs_est_time"] = lambda: plots.metric_vs_est_time(curve_frame, look, metrics, name)
    split = subsets.by_subset(study, summary) if subsets.has_subsets(study) else None
    if split is not None:
        figures["metric_vs_speedup_by_subset"] = lambda: subsets.metric_vs_speedup_by_subset(split, look, metrics)
    paths: dict[str, Path] = {}
    images: dict[str, bytes] = {}
    for stem, draw in figures.items():
        png = draw()
        images[f"{stem}.png"] = png
        paths[stem] = write_atomic(out / f"{stem}.png", png)
    # Runs of real K-worker time beside their estimates (report/measured.py).
    measured_blocks, measured_images = measured.section(estimates) if estimates is not None else ([], {})
    for file, png in measured_images.items():
        images[file] = png
        paths[file.removesuffix(".png")] = write_atomic(out / file, png)

    sheets = {
        "summary": summary,
        "status": status,
        "baseline": baseline,
        "runs": study.runs,
        "metrics": _metrics_sheet(study),
    }
    if split is not None:
        sheets["by_subset"] = subsets.sheet(split, metrics)
    if estimates is not None:
        sheets["cluster"] = _cluster_sheet(estimates)
    paths["xlsx"] = write_xlsx(out / "results.xlsx", sheets)
    blocks = _document(study, summary, status, baseline, estimates)
    if split is not None:  # right after the headline plot
        at = next(i for i, b in enumerate(blocks) if isinstance(b, Image)) + 1
        blocks[at:at] = [Image("metric_vs_speedup_by_subset.png", PLOTS["metric_vs_speedup_by_subset"])]
    if measured_blocks:
        at = next(i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.text == "Run status")
        blocks[at:at] = measured_blocks
    paths["markdown"] = write_atomic(out / "report.md", to_markdown(blocks))
    paths["html"] = write_atomic(out / "report.html", to_html(blocks, TITLE, images))
    log.info("report of %s written to %s", study.root, out)
    return paths


def _metrics_sheet(study: Study) -> pd.DataFrame:
    """Every evaluation row with its run's identity in front (``lr`` is the scheduled rate)."""
    ident = study.runs[["run_id", "status", "workload", "variant", "workers", "batch_size", "seed"]]
    metrics = study.metrics.merge(ident, on="run_id", how="left")
    if "by_scope" in metrics.columns:  # JSON text in one cell, not a Python repr
        metrics["by_scope"] = [
            json.dumps(v, sort_keys=True) if isinstance(v, dict) else None for v in metrics["by_scope"]
        ]
    front = list(ident.columns)
    return metrics[front + [c for c in metrics.columns if c not in front]]


def _document(
    study: Study,
    summary: pd.DataFrame,
    status: pd.DataFrame,
    baseline: pd.DataFrame,
    estimates: ClusterEstimates | None = None,
) -> list[Block]:
    runs = study.runs
    counts = runs["status"].value_counts()
    workloads = sorted(runs["workload"].unique(), key=natural_key)
    seeds = sorted(runs["seed"].dropna().unique())
    fixed = sorted({str(v) for v in runs.get("config.fixed", pd.Series(dtype=object)).dropna()})
    fixed_text = {"worker_batch": "the per-worker batch B", "global_batch": "the global batch K·B"}
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    plan = study.plan
    intro = []
    if plan.get("study"):
        description = str(plan.get("description") or "").strip()
        if description and description[-1] not in ".!?":
            description += "."
        intro.append(f"Study `{plan['study']}`" + (f": {description}" if description else "."))
    intro.append(f"Store `{study.root}`, generated {generated}.")
    planned = plan.get("runs")
    pending = []
    if isinstance(planned, list):
        done = set(runs["run_id"])
        missing = sum(1 for r in planned if isinstance(r, dict) and r.get("run_id") not in done)
        if missing:
            pending.append(f"{missing} of the {len(planned)} planned runs have not finished yet.")

    blocks: list[Block] = [
        Heading(1, TITLE),
        Paragraph(" ".join(intro)),
        Bullets(
            [
                f"Workload{'s' if len(workloads) > 1 else ''}: {', '.join(workloads)}.",
                f"{len(runs)} finished runs: "
                + ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("completed", "failed", "diverged"))
                + f", in {status.shape[0]} configurations "
                f"({runs['variant'].nunique()} variants, K ∈ "
                f"{{{', '.join(str(k) for k in sorted(runs['workers'].unique()))}}}).",
                *pending,
                f"Seeds: {', '.join(str(s) for s in seeds)}.",
                *(
                    [f"Held fixed when K varies: {', '.join(fixed_text.get(f, f) for f in fixed)}."]
                    if fixed
                    else []
                ),
                *_baseline_lines(baseline),
                "Tables show mean ± std over seeds (std with ddof=1, blank for one seed) of the "
                "completed runs only; failed and diverged runs are listed in the status table. "
                "Final = the last evaluation; wall time is training time without evaluation.",
                *(
                    [
                        "Runs of an engine that computes all K workers in one process ("
                        + ", ".join(
                            f"`{e}`"
                            for e in sorted(set(runs.loc[~runs["real_wall_time"].astype(bool), "engine"]))
                        )
                        + "): their wall time and speedup measure the simulation on this machine, "
                        "not K workers; `localsgd report --cluster NAME` estimates the time on a cluster."
                    ]
                    if (~runs["real_wall_time"].astype(bool)).any()
                    else []
                ),
            ]
        ),
        Bullets(_metric_lines(study)),
        Heading(2, "Primary metric against speedup"),
        Image("metric_vs_speedup.png", PLOTS["metric_vs_speedup"]),
        Heading(2, "Summary"),
        _summary_display(study, summary),
        Heading(2, "Training curves"),
        Image("metric_vs_epochs.png", PLOTS["metric_vs_epochs"]),
        Image("metric_vs_wall_time.png", PLOTS["metric_vs_wall_time"]),
        Image("train_loss_vs_epochs.png", PLOTS["train_loss_vs_epochs"]),
        Image("train_loss_vs_wall_time.png", PLOTS["train_loss_vs_wall_time"]),
        Heading(2, "Communication"),
        Image("metric_vs_bytes.png", PLOTS["metric_vs_bytes"]),
        Paragraph(
            "H·K: H is each algorithm's synchronisation period (its `sync_period`: local steps "
            "between two averagings; hierarchical local SGD: between block averagings), K the "
            "workers; algorithms that synchronise every step count as H = 1, and those without a "
            "comparable period"
            + (
                f" ({', '.join(sorted(set(runs.loc[runs['period'].isna(), 'algorithm'])))})"
                if runs["period"].isna().any()
                else ""
            )
            + " are left out."
        ),
        Image("metric_vs_period_workers.png", PLOTS["metric_vs_period_workers"]),
        *(_cluster_section(study, summary, estimates) if estimates is not None else []),
        Heading(2, "Run status"),
        _status_display(study, status),
        Paragraph(
            "Every run's config, final metrics and evaluation rows are in `results.xlsx` "
            "(sheets summary, status, baseline, runs, metrics"
            + (", cluster; the estimates are the est_* columns)." if estimates is not None else ").")
        ),
    ]
    return blocks


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


def _metric_format(metric: Metric) -> str:
    return ".2f" if metric.unit == "%" else ".4g"


def _metric_columns(study: Study, *, best: bool, every: bool) -> list[tuple[str, Callable[[Any], str]]]:
    """Display columns of the declared metrics: the final value of every metric (or of the
    primary ones only), and the best value of the primary ones."""
    primaries = {study.primaries[w] for w in study.primaries}
    columns: list[tuple[str, Callable[[Any], str]]] = []
    for m in study.metric_list():
        if not every and m.name not in primaries:
            continue
        spec = _metric_format(m)

        def final(r: Any, m: Metric = m, spec: str = spec) -> str:
            return fmt_pm(
                getattr(r, f"final_{m.name}_mean"), getattr(r, f"final_{m.name}_std"), spec, m.scale
            )

        columns.append((f"final {m.heading}", final))
        if best and m.name in primaries:

            def best_cell(r: Any, m: Metric = m, spec: str = spec) -> str:
                return fmt_pm(
                    getattr(r, f"best_{m.name}_mean"), getattr(r, f"best_{m.name}_std"), spec, m.scale
                )

            columns.append((f"best {m.heading}", best_cell))
    return columns


def _target_text(estimates: ClusterEstimates, workload: str) -> str:
    target = estimates.targets.get(str(workload))
    if target is None or target.metric is None or not math.isfinite(target.value):
        return ""
    return f"{target.value * target.metric.scale:.4g}{target.metric.unit}"


def _link_text(alpha: float, bandwidth: float) -> str:
    return f"α = {alpha * 1e6:.4g} µs, β = {bandwidth / GBIT:.4g} Gb/s ({bandwidth / 1e9:.4g} GB/s)"


def _cluster_lines(estimates: ClusterEstimates) -> list[str]:
    cluster = estimates.cluster
    g = cluster.devices_per_node
    lines = [
        f"Cluster `{cluster.name}`" + (f": {cluster.description}." if cluster.description else "."),
        f"{g} device{'s' if g > 1 else ''} per node; K workers fill ceil(K/{g}) nodes in rank order. "
        + (
            f"Intra-node link: {_link_text(cluster.intra.alpha, cluster.intra.bandwidth)}. "
            if cluster.intra
            else ""
        )
        + f"Inter-node link: {_link_text(cluster.inter.alpha, cluster.inter.bandwidth)}.",
        "Communication: each collective of a run is costed as a ring all-reduce "
        "(2(p−1)·α + 2(p−1)/p · n/β; "
        + (
            "hierarchical across nodes of several devices"
            if cluster.allreduce == "hierarchical"
            else "one flat ring over all ranks across nodes, as gloo runs it"
        )
        + "), summed over the run's per-scope counters (collectives, payload bytes), plus a run's "
        "injected delay (comm.delay) per collective of its scope; see docs/costmodel.md.",
    ]
    if cluster.seconds_per_sample is not None:
        lines.append(
            f"Compute per step: B × {cluster.seconds_per_sample:.4g} s per sample (the cluster's device)."
        )
    else:
        lines.append(
            "Compute per step: measured in each run on the machine that ran it, "
            "(wall time − communication time) / steps. Where K worker processes shared fewer cores "
            "than K this includes contention, so the estimate is pessimistic for large K; give the "
            "cluster a seconds_per_sample (cluster TOML) to cost compute on the target device."
        )
        if (~estimates.study.runs["real_wall_time"].astype(bool)).any():
            lines.append(
                "Runs of an engine that computes all K workers in one process: a worker's "
                "compute per step is taken from the single-worker runs of the same workload and "
                "per-worker batch when the study has them, else the simulated step time divided by "
                "K (batched replicas cost less than K separate steps, so that leans optimistic)."
            )
    lines.append("Estimated time = compute + communication (no overlap assumed); evaluation excluded.")
    for workload, target in sorted(estimates.targets.items(), key=lambda kv: natural_key(kv[0])):
        if target.metric is not None and math.isfinite(target.value):
            m = target.metric
            lines.append(
                f"Target for {workload}: {m.title} {'≥' if m.higher_is_better else '≤'} "
                f"{target.value * m.scale:.4g}{m.unit} ({target.how}); time to target = the estimate "
                "at the first evaluation reaching it, blank unless every seed did."
            )
        else:
            lines.append(f"Target for {workload}: none ({target.how}).")
    return lines


def _cluster_section(study: Study, summary: pd.DataFrame, estimates: ClusterEstimates) -> list[Block]:
    name = estimates.cluster.name
    table = (
        Table(["note"], [["no completed run: nothing to estimate"]])
        if summary.empty
        else frame_rows(
            summary,
            [
                *_key_columns(study),
                ("seeds", lambda r: str(r.n_seeds)),
                *_metric_columns(study, best=False, every=False),
                (
                    "est. compute s",
                    lambda r: fmt_pm(r.est_compute_seconds_mean, r.est_compute_seconds_std, ".4g"),
                ),
                ("est. comm s", lambda r: fmt_pm(r.est_comm_seconds_mean, r.est_comm_seconds_std, ".4g")),
                ("est. total s", lambda r: fmt_pm(r.est_total_seconds_mean, r.est_total_seconds_std, ".4g")),
                ("est. speedup (×)", lambda r: fmt(r.est_speedup, ".2f")),
                ("target", lambda r: _target_text(estimates, r.workload)),
                ("reached", lambda r: f"{r.est_target_reached}/{r.n_seeds}"),
                ("to target: compute s", lambda r: fmt(r.est_target_compute_seconds_mean, ".4g")),
                ("to target: comm s", lambda r: fmt(r.est_target_comm_seconds_mean, ".4g")),
                (
                    "to target: total s",
                    lambda r: fmt_pm(r.est_target_total_seconds_mean, r.est_target_total_seconds_std, ".4g"),
                ),
            ],
        )
    )
    return [
        Heading(2, f"Estimated on cluster {name}"),
        Bullets(_cluster_lines(estimates)),
        Image(
            "metric_vs_est_speedup.png",
            CLUSTER_PLOTS["metric_vs_est_speedup"].replace("the cluster", name),
        ),
        table,
        Image("metric_vs_est_time.png", CLUSTER_PLOTS["metric_vs_est_time"].replace("the cluster", name)),
    ]


def _cluster_sheet(estimates: ClusterEstimates) -> pd.DataFrame:
    """The cluster's parameters and the targets, one (item, value) row each."""
    cluster = estimates.cluster
    rows: list[tuple[str, Any]] = [
        ("name", cluster.name),
        ("description", cluster.description),
        ("devices_per_node", cluster.devices_per_node),
        ("intra.alpha_seconds", cluster.intra.alpha if cluster.intra else None),
        ("intra.bandwidth_bytes_per_second", cluster.intra.bandwidth if cluster.intra else None),
        ("inter.alpha_seconds", cluster.inter.alpha),
        ("inter.bandwidth_bytes_per_second", cluster.inter.bandwidth),
        ("seconds_per_sample", cluster.seconds_per_sample),
        ("compute", "seconds_per_sample × B" if cluster.seconds_per_sample is not None else "measured"),
    ]
    for workload, target in estimates.targets.items():
        rows.append((f"target_metric[{workload}]", target.metric.name if target.metric else None))
        rows.append((f"target_value[{workload}]", target.value))
        rows.append((f"target_how[{workload}]", target.how))
    return pd.DataFrame(rows, columns=["item", "value"]).astype({"value": object})


def _baseline_lines(baseline: pd.DataFrame) -> list[str]:
    lines = []
    for row in baseline.to_dict("records"):
        where = str(row["workload"]) + (f" [{row['setting']}]" if row.get("setting") else "")
        if row["runs"]:
            lines.append(
                f"Speedup baseline for {where}: the {row['runs']} completed K=1 run(s) "
                f"({row['variants']}; seeds {row['seeds']}), mean wall time "
                f"{fmt_pm(row['wall_seconds_mean'], row['wall_seconds_std'], '.1f')} s. "
                "Speedup = that mean / a configuration's mean wall time."
            )
        else:
            lines.append(f"Speedup baseline for {where}: none (no completed K=1 run); speedup is blank.")
    return lines


def _key_columns(study: Study) -> list[tuple[str, Callable[[Any], str]]]:
    runs = study.runs
    columns: list[tuple[str, Callable[[Any], str]]] = []
    if runs["workload"].nunique() > 1:
        columns.append(("workload", lambda r: str(r.workload)))
    columns += [
        ("variant", lambda r: str(r.variant)),
        ("K", lambda r: str(r.workers)),
        ("B", lambda r: str(r.batch_size)),
        ("lr", lambda r: fmt(r.lr, "g")),
    ]
    if "engine" in study.group_keys:
        columns.append(("engine", lambda r: str(r.engine)))
    if "setting" in study.group_keys:
        columns.append(("setting", lambda r: str(r.setting)))
    return columns


def _summary_display(study: Study, summary: pd.DataFrame) -> Table:
    if summary.empty:
        return Table(["note"], [["no completed run: nothing to average"]])
    return frame_rows(
        summary,
        [
            *_key_columns(study),
            ("seeds", lambda r: str(r.n_seeds)),
            *_metric_columns(study, best=True, every=True),
            ("final train loss", lambda r: fmt_pm(r.final_train_loss_mean, r.final_train_loss_std, ".4f")),
            ("wall time (s)", lambda r: fmt_pm(r.wall_seconds_mean, r.wall_seconds_std, ".1f")),
            ("speedup (×)", lambda r: fmt(r.speedup, ".2f")),
            ("payload/worker", lambda r: fmt_bytes(r.bytes_mean)),
            ("syncs", lambda r: fmt(r.syncs_mean, ".6g")),
            ("samples/s", lambda r: fmt_pm(r.samples_per_second_mean, r.samples_per_second_std, ".0f")),
        ],
    )


def _status_display(study: Study, status: pd.DataFrame) -> Table:
    runs = study.runs

    def errors(row: Any) -> str:
        same = (runs["workload"] == row.workload) & (runs["group"] == row.group)
        bad = runs[same & (runs["status"] != "completed")]
        return "\n".join(
            f"seed {r.seed} ({r.status}): {short_error(str(r.error or 'no error recorded'))}"
            for r in bad.itertuples(index=False)
        )

    return frame_rows(
        status,
        [
            *_key_columns(study),
            ("completed", lambda r: str(r.completed)),
            ("failed", lambda r: str(r.failed)),
            ("diverged", lambda r: str(r.diverged)),
            ("errors (last line)", errors),
        ],
    )
