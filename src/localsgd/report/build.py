"""``make_report``: a store in; tables, figures (PNG, PDF, SVG), report.md, report.html and
results.xlsx out."""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from localsgd.costmodel import GBIT, Cluster, load_cluster
from localsgd.records import Metric
from localsgd.report import (
    asynchrony,
    curve_plots,
    graphics,
    hk_plots,
    measured,
    plots,
    stages,
    steps,
    steps_plots,
    subsets,
    switch_plots,
    workbook,
)
from localsgd.report.estimates import ClusterEstimates, estimate, parse_target
from localsgd.report.render import (
    Block,
    Bullets,
    Contents,
    Figure,
    Heading,
    Links,
    Paragraph,
    Table,
    frame_rows,
    short_error,
    to_html,
    to_markdown,
)
from localsgd.report.rounding import fmt, fmt_bytes, fmt_pm
from localsgd.report.selection import Selection, check_split, selection
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
FORMATS = graphics.FORMATS
DPI = graphics.DPI
NOT_APPLICABLE = "—"


@dataclass(frozen=True)
class Drawing:
    """A figure of the report: its file stem, caption and how to draw it."""

    stem: str
    caption: str
    draw: Callable[[], graphics.Plot]


def check_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,pdf"`` or ``["png", "pdf"]`` -> ``("png", "pdf")``; ``ValueError`` naming
    ``--format`` and the allowed formats."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = tuple(dict.fromkeys(str(f).strip().lower() for f in items if str(f).strip()))
    wrong = [f for f in chosen if f not in FORMATS]
    if wrong or not chosen:
        raise ValueError(f"--format must be a comma-separated list of {', '.join(FORMATS)}, got {formats!r}")
    return chosen


def check_dpi(dpi: int) -> int:
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not 50 <= dpi <= 1200:
        raise ValueError(f"--dpi must be a whole number from 50 to 1200, got {dpi!r}")
    return dpi


def make_report(
    store_dir: str | Path,
    out_dir: str | Path | None = None,
    cluster: Cluster | str | Path | None = None,
    target: str | None = None,
    formats: str | Sequence[str] = FORMATS,
    dpi: int = DPI,
    select_on: str = "validation",
) -> dict[str, Path]:
    """Write the report of the store at ``store_dir`` into ``out_dir`` (default
    ``STORE/report``) and return the paths written: ``markdown``, ``html``, ``xlsx`` and
    ``<figure>.<format>`` for every figure drawn in every one of ``formats`` (PNG, PDF,
    SVG; PNG at ``dpi``).

    With ``cluster`` (a :class:`~localsgd.costmodel.Cluster`, a preset name or a cluster
    TOML path), the report adds wall-clock estimates on that cluster: summary columns,
    time to ``target`` (``"METRIC=VALUE"`` or a value of the primary metric; default: the
    best mean final value of each workload's primary metric, 5 % short of it), and three
    figures. With ``target``, or a ``[study] target`` table in the study's plan, the report
    adds steps-to-result (:mod:`~localsgd.report.steps`): a table, its figures and a
    workbook sheet. Targets and steps-to-result read the split ``select_on`` names
    (``validation``, held out of the training data, or ``test``; a workload whose runs hold
    no validation split is selected on test, and the report says so); every other figure
    and table shows the test split. Reads only the store. Each file is written to a temporary name and renamed
    into place; the figures and the workbook come before the documents that refer to them.
    ``ValueError`` when ``store_dir`` is not a store or has no finished run, for an
    unknown cluster, a malformed target, format or dpi.
    """
    chosen = check_formats(formats)
    dpi = check_dpi(dpi)
    goal = parse_target(target)
    check_split(select_on)
    resolved = cluster if isinstance(cluster, Cluster) or cluster is None else load_cluster(cluster)
    study = load(store_dir)
    select = selection(study, select_on)
    out = Path(out_dir) if out_dir is not None else study.root / "report"

    summary = summary_table(study)
    estimates: ClusterEstimates | None = None
    if resolved is not None:
        estimates = estimate(study, summary, resolved, goal, select)
        study, summary = estimates.study, estimates.summary
    # Steps-to-result at the target (--target, else the study's [study] target table).
    goals = steps.goals(study, target)
    step_table = steps.steps_table(study, goals, select) if goals else None
    out.mkdir(parents=True, exist_ok=True)
    status = status_table(study)
    baseline = baseline_table(study)
    curve_frame = curves(study)
    look = graphics.styles(summary)
    metrics = {w: m for w in study.declared if (m := study.primary(w)) is not None}

    split = subsets.by_subset(study, summary) if subsets.has_subsets(study) else None
    drawings = _drawings(summary, curve_frame, look, metrics, resolved.name if resolved else None)
    drawings += _extra_drawings(study, curve_frame, look, step_table)
    if split is not None:  # right after the headline figure
        drawings.insert(
            [d.stem for d in drawings].index("metric_vs_speedup") + 1,
            Drawing(
                "metric_vs_speedup_by_subset",
                "The same, one panel per workload and training subset (workbook sheet by_subset)",
                lambda: subsets.metric_vs_speedup_by_subset(split, look, metrics),
            ),
        )
    paths: dict[str, Path] = {}
    images: dict[str, bytes] = {}
    drawn: dict[str, graphics.Plot] = {}
    for drawing in drawings:
        plot = drawing.draw()
        drawn[drawing.stem] = plot
        if plot.figure is not None:
            _write_figure(out, drawing.stem, plot.figure, chosen, dpi, images, paths)
    # Sections that are a module each, returning their blocks and figures: runs of real
    # K-worker time beside their estimates (measured.py), asynchronous runs (asynchrony.py),
    # local SGD's H·K trade-off (hk_plots.py), post-local SGD's switch point (switch_plots.py).
    measured_blocks, measured_figures = (
        measured.section(estimates, look, chosen) if estimates is not None else ([], {})
    )
    async_blocks, async_figures = asynchrony.section(study, look, chosen)
    hk_blocks, hk_figures = hk_plots.section(summary, metrics, chosen)
    switch_blocks, switch_figures = switch_plots.section(study, metrics, chosen)
    for figures_of_section in (measured_figures, async_figures, hk_figures, switch_figures):
        for stem, figure in figures_of_section.items():
            _write_figure(out, stem, figure, chosen, dpi, images, paths)

    sheets = {
        "summary": workbook.Sheet(summary, "variant"),
        "status": workbook.Sheet(status, "variant"),
        "baseline": workbook.Sheet(baseline, "workload"),
        "runs": workbook.Sheet(workbook.runs_sheet(study.runs), "run_id"),
        "metrics": workbook.Sheet(workbook.metrics_sheet(study.metrics, study.runs), "run_id"),
    }
    if split is not None:
        sheets["by_subset"] = workbook.Sheet(subsets.sheet(split, metrics), "group")
    if estimates is not None:
        sheets["cluster"] = workbook.Sheet(_cluster_sheet(estimates), "item")
    if step_table is not None:
        sheets["steps_to_result"] = workbook.Sheet(step_table, "curve")
    paths["xlsx"] = workbook.write_workbook(out / "results.xlsx", sheets, study.metric_list())
    figures = {d.stem: (d, drawn[d.stem]) for d in drawings}
    blocks = _document(study, summary, status, baseline, figures, chosen, estimates)
    sections = _training_error_blocks(figures, chosen)
    if step_table is not None:
        sections += _steps_section(goals, step_table, select, lambda stem: _figure_blocks(figures, stem, chosen))
    at = next(i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.text == "Run status")
    blocks[at:at] = sections
    for extra in (stages.section(study), measured_blocks, async_blocks, hk_blocks, switch_blocks):
        if not extra:
            continue
        at = next(i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.text == "Run status")
        blocks[at:at] = extra
        blocks += [
            Links(block.caption, [(f.upper(), f"{block.stem}.{f}") for f in chosen])
            for block in extra
            if isinstance(block, Figure)
        ]
    paths["markdown"] = write_atomic(out / "report.md", to_markdown(blocks))
    paths["html"] = write_atomic(out / "report.html", to_html(blocks, TITLE, images))
    log.info("report of %s written to %s", study.root, out)
    return paths


def _write_figure(
    out: Path,
    stem: str,
    figure: Any,
    formats: Sequence[str],
    dpi: int,
    images: dict[str, bytes],
    paths: dict[str, Path],
) -> None:
    """``stem.<format>`` for each format, and the PNG for the HTML page (written or not)."""
    files = graphics.render(figure, formats, dpi)
    images[stem] = files["png"]
    for kind in formats:
        paths[f"{stem}.{kind}"] = write_atomic(out / f"{stem}.{kind}", files[kind])


def _drawings(
    summary: pd.DataFrame,
    curve_frame: pd.DataFrame,
    look: dict[str, graphics.Style],
    metrics: graphics.Metrics,
    cluster: str | None,
) -> list[Drawing]:
    out = [
        Drawing(
            "pareto_speedup",
            "Pareto front: final primary metric against speedup over one worker (mean ± std over "
            "seeds on both axes; the dashed staircase joins the configurations no other beats on both)",
            lambda: plots.pareto_speedup(summary, look, metrics),
        ),
        Drawing(
            "metric_vs_speedup",
            "Final primary metric against speedup over one worker (mean ± std over seeds on both axes)",
            lambda: plots.metric_vs_speedup(summary, look, metrics),
        ),
        Drawing(
            "metric_vs_epochs",
            "Primary metric against epochs (mean, band ± std over seeds)",
            lambda: curve_plots.metric_vs_epochs(curve_frame, look, metrics),
        ),
        Drawing(
            "metric_vs_wall_time",
            "Primary metric against training wall time (mean, band ± std over seeds)",
            lambda: curve_plots.metric_vs_wall_time(curve_frame, look, metrics),
        ),
        Drawing(
            "train_loss_vs_epochs",
            "Train loss against epochs (mean, band ± std over seeds)",
            lambda: curve_plots.train_loss_vs_epochs(curve_frame, look),
        ),
        Drawing(
            "train_loss_vs_wall_time",
            "Train loss against training wall time (mean, band ± std over seeds)",
            lambda: curve_plots.train_loss_vs_wall_time(curve_frame, look),
        ),
        Drawing(
            "metric_vs_bytes",
            "Final primary metric against communication volume (mean ± std over seeds)",
            lambda: plots.metric_vs_bytes(summary, look, metrics),
        ),
        Drawing(
            "metric_vs_period_workers",
            "Final primary metric against H·K (mean ± std over seeds; long dashes: mini-batch SGD at each K)",
            lambda: plots.metric_vs_period_workers(summary, look, metrics),
        ),
    ]
    if cluster is not None:
        out += [
            Drawing(
                "pareto_est_time",
                f"Pareto front: final primary metric against estimated training time on {cluster} "
                "(mean ± std over seeds on both axes)",
                lambda: plots.pareto_est_time(summary, look, metrics, cluster),
            ),
            Drawing(
                "metric_vs_est_speedup",
                f"Final primary metric against estimated speedup over one worker on {cluster} "
                "(mean ± std over seeds on both axes)",
                lambda: plots.metric_vs_est_speedup(summary, look, metrics, cluster),
            ),
            Drawing(
                "metric_vs_est_time",
                f"Primary metric against estimated training time on {cluster} (mean, band ± std over seeds)",
                lambda: curve_plots.metric_vs_est_time(curve_frame, look, metrics, cluster),
            ),
        ]
    return out


def _extra_drawings(
    study: Study,
    curve_frame: pd.DataFrame,
    look: dict[str, graphics.Style],
    step_table: pd.DataFrame | None,
) -> list[Drawing]:
    """Training error against epochs where a workload evaluates it (Goyal et al.'s Figure
    2), and the steps-to-result figures when the report has a target."""
    out = []
    errors = {w: m for w, ms in study.declared.items() for m in ms if m.name == "train_error"}
    if errors:
        out.append(
            Drawing(
                "train_error_vs_epochs",
                "Training error against epochs (mean, band ± std over seeds)",
                lambda: curve_plots.metric_vs_epochs(curve_frame, look, errors),
            )
        )
    if step_table is not None:
        table = step_table
        out += [
            Drawing(
                "steps_to_result",
                "Steps to result against the global batch K·B (log-log; the best trial's mean ± std over its seeds; "
                "dash-dotted: perfect scaling from each curve's smallest batch; segment styles: the regimes)",
                lambda: steps_plots.steps_to_result(table),
            ),
            Drawing(
                "steps_to_result_normalised",
                "Steps to result divided by each curve's steps at its smallest batch (log-log)",
                lambda: steps_plots.steps_normalised(table),
            ),
            Drawing(
                "best_metaparameters",
                "The best trial's learning rate and momentum against the global batch K·B",
                lambda: steps_plots.best_metaparameters(table),
            ),
            Drawing(
                "local_sgd_steps_to_result",
                "Local SGD: optimizer steps and communication rounds to result against the effective "
                "batch K·B, one line per variant (H)",
                lambda: steps_plots.local_sgd_steps(table),
            ),
        ]
    return out


def _training_error_blocks(figures: FigureMap, formats: Sequence[str]) -> list[Block]:
    blocks = _figure_blocks(figures, "train_error_vs_epochs", formats)
    return [Heading(2, "Training error"), *blocks] if blocks else []


def _steps_section(
    goals: dict[str, steps.Goal],
    table: pd.DataFrame,
    select: Selection,
    figure: Callable[[str], list[Block]],
) -> list[Block]:
    """Steps-to-result: the rule, the targets, the table and its figures."""
    lines = [
        f"Target for {w}: {select.split(w)} {g.metric.title.removeprefix('test ')} "
        f"{'>' if g.metric.higher_is_better else '<'} {fmt(g.value, g.metric.scale)}{g.metric.unit} "
        f"({g.how}); {select.sentence(w).split(': ', 1)[1]}."
        for w, g in goals.items()
    ]
    lines += [
        "Steps to result of a cell (workload, variant, K, B, and the config keys that set it apart): "
        "the smallest, over its trials (runs that differ only in their searched metaparameters and "
        "learning rate), of the trial's mean over its seeds of the first evaluated step at which the "
        "metric strictly crosses the target on the split named above (google-research batch_science's "
        "measurement); seeds are replicates of a trial, never trials of their own, and a trial "
        "reaches the target only when every seed does; ± is the std over seeds. reached = the trials "
        "that reached it; the best trial's metaparameters are those of that trial, and its test "
        "metric is given at the crossing and at the end of training. Resolution: the evaluation "
        "interval (train.eval_every).",
        f"Regimes along a curve, from the local slope of log steps against log K·B between "
        f"neighbouring batches (the first batch takes its first segment's): slope ≤ {steps.PERFECT:g} "
        f"perfect scaling, ≥ {steps.MAXIMAL:g} maximal data parallelism, in between diminishing returns "
        "(these thresholds are this project's heuristic, not Shallue et al.'s).",
        "Communication rounds: the synchronisations counted up to the crossing evaluation (K>1).",
    ]
    rows = frame_rows(
        table,
        [
            ("workload", lambda r: str(r.workload)),
            ("curve", lambda r: str(r.curve)),
            ("K", lambda r: str(r.workers)),
            ("B", lambda r: str(r.batch_size)),
            ("K·B", lambda r: str(r.global_batch)),
            ("reached", lambda r: f"{r.reached}/{r.trials}"),
            ("seeds", lambda r: str(r.seeds)),
            ("steps", lambda r: fmt_pm(r.steps, r.steps_std) if math.isfinite(r.steps) else "not reached"),
            ("epochs", lambda r: fmt(r.epochs)),
            ("rounds", lambda r: NOT_APPLICABLE if int(r.workers) == 1 else fmt(r.rounds)),
            ("slope", lambda r: fmt(r.slope)),
            ("regime", lambda r: str(r.regime)),
            ("best trial", lambda r: str(r.best_metaparameters)),
            ("test at result", lambda r: _metric_value(goals, r, r.test_at_result)),
            ("final test", lambda r: _metric_value(goals, r, r.final_test)),
        ],
    )
    return [
        Heading(2, "Steps to result"),
        Bullets(lines),
        rows,
        *figure("steps_to_result"),
        *figure("steps_to_result_normalised"),
        *figure("best_metaparameters"),
        *figure("local_sgd_steps_to_result"),
    ]


def _metric_value(goals: dict[str, steps.Goal], row: Any, value: float) -> str:
    """A value of the row's target metric, as the report shows it (blank without one)."""
    metric = goals[str(row.workload)].metric
    return f"{fmt(value, metric.scale)}{metric.unit}" if math.isfinite(value) else ""


FigureMap = dict[str, tuple[Drawing, graphics.Plot]]


def _figure_blocks(figures: FigureMap, stem: str, formats: Sequence[str]) -> list[Block]:
    """The figure with its caption and files, or a sentence saying why there is none; a
    note for workloads left out of a drawn figure."""
    if stem not in figures:  # a figure this study does not call for
        return []
    drawing, plot = figures[stem]
    if plot.figure is None:
        reasons = sorted(set(plot.left_out.values()))
        return [Paragraph(f"No figure “{drawing.caption.split(' (')[0]}”: {'; '.join(reasons)}.")]
    blocks: list[Block] = [Figure(stem, drawing.caption, formats)]
    if plot.left_out:
        blocks.append(
            Paragraph(
                "Not in this figure: "
                + "; ".join(f"{w} ({why})" for w, why in sorted(plot.left_out.items()))
                + "."
            )
        )
    return blocks


def _document(
    study: Study,
    summary: pd.DataFrame,
    status: pd.DataFrame,
    baseline: pd.DataFrame,
    figures: FigureMap,
    formats: Sequence[str],
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
    simulated = sorted(set(runs.loc[~runs["real_wall_time"].astype(bool), "engine_name"]))

    def figure(stem: str) -> list[Block]:
        return _figure_blocks(figures, stem, formats)

    blocks: list[Block] = [
        Heading(1, TITLE),
        Paragraph(" ".join(intro)),
        Contents(),
        Heading(2, "Overview"),
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
                "Tables show mean ± std over seeds (std with ddof=1) of the completed runs only; failed "
                "and diverged runs are listed in the status table. Final = the last evaluation; wall "
                "time is training time without evaluation. Rounding: the std keeps two significant "
                "digits when its first is 1 or 2, else one, and the mean is rounded to the same place; "
                "a value without ± (one seed, or all seeds equal) keeps four significant digits. "
                f"{NOT_APPLICABLE} marks a figure that does not apply (a single worker communicates "
                "nothing).",
                *(
                    [
                        "Runs of an engine that computes all K workers in one process ("
                        + ", ".join(f"`{e}`" for e in simulated)
                        + "): their wall time and speedup measure the simulation on this machine, "
                        "not K workers; `localsgd report --cluster NAME` estimates the time on a cluster."
                    ]
                    if simulated
                    else []
                ),
            ]
        ),
        Bullets(_metric_lines(study)),
        Heading(2, "Primary metric against speedup"),
        Paragraph(
            "Speedup = the mean wall time of the K=1 baseline / a configuration's mean wall time; its "
            "± propagates the spread of both wall times, speedup · sqrt((σ₁/T₁)² + (σ/T)²) (σ the std "
            "over seeds), and is drawn as horizontal error bars. Each algorithm family has one colour "
            "in every figure; when markers would hide one another, the figure has one panel per family "
            "with the other points in grey. A configuration far below (above) the others is drawn at "
            "the edge of the axis with its value, so that it does not squeeze the rest."
        ),
        *figure("pareto_speedup"),
        *figure("metric_vs_speedup"),
        *figure("metric_vs_speedup_by_subset"),
        Heading(2, "Summary"),
        _summary_display(study, summary),
        Heading(2, "Training curves"),
        *figure("metric_vs_epochs"),
        *figure("metric_vs_wall_time"),
        *figure("train_loss_vs_epochs"),
        *figure("train_loss_vs_wall_time"),
        Heading(2, "Communication"),
        *figure("metric_vs_bytes"),
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
            + " are left out, as are K=1 runs. Points at the same H·K are spread sideways so that "
            "none hides another."
        ),
        *figure("metric_vs_period_workers"),
        *(_cluster_section(study, summary, estimates, figure) if estimates is not None else []),
        Heading(2, "Run status"),
        _status_display(study, status),
        Heading(2, "Files"),
        Paragraph(
            "Every run's config (the fields that apply to it), final metrics and evaluation rows are "
            "in the workbook: sheets summary, status, baseline, runs, metrics"
            + (", cluster" if estimates is not None else "")
            + (", steps_to_result" if "steps_to_result" in figures else "")
            + " and units (the unit and meaning of every column)."
        ),
        Links("Tables", [("results.xlsx", "results.xlsx"), ("report.md", "report.md")]),
        *[
            Links(drawing.caption.split(" (")[0], [(f.upper(), f"{stem}.{f}") for f in formats])
            for stem, (drawing, plot) in figures.items()
            if plot.figure is not None
        ],
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


def _metric_columns(study: Study, *, best: bool, every: bool) -> list[tuple[str, Callable[[Any], str]]]:
    """Display columns of the declared metrics: the final value of every metric (or of the
    primary ones only), and the best value of the primary ones."""
    primaries = {study.primaries[w] for w in study.primaries}
    columns: list[tuple[str, Callable[[Any], str]]] = []
    for m in study.metric_list():
        if not every and m.name not in primaries:
            continue

        def final(r: Any, m: Metric = m) -> str:
            return fmt_pm(getattr(r, f"final_{m.name}_mean"), getattr(r, f"final_{m.name}_std"), m.scale)

        columns.append((f"final {m.heading}", final))
        if best and m.name in primaries:

            def best_cell(r: Any, m: Metric = m) -> str:
                return fmt_pm(getattr(r, f"best_{m.name}_mean"), getattr(r, f"best_{m.name}_std"), m.scale)

            columns.append((f"best {m.heading}", best_cell))
    return columns


def _target_text(estimates: ClusterEstimates, workload: str) -> str:
    target = estimates.targets.get(str(workload))
    if target is None or target.metric is None or not math.isfinite(target.value):
        return ""
    return f"{fmt(target.value, target.metric.scale)}{target.metric.unit}"


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
                f"Target for {workload}: {target.split} {m.title.removeprefix('test ')} "
                f"{'≥' if m.higher_is_better else '≤'} "
                f"{target.value * m.scale:.4g}{m.unit} ({target.how}); time to target = the estimate "
                "at the first evaluation reaching it, blank unless every seed did."
            )
        else:
            lines.append(f"Target for {workload}: none ({target.how}).")
    return lines


def _cluster_section(
    study: Study,
    summary: pd.DataFrame,
    estimates: ClusterEstimates,
    figure: Callable[[str], list[Block]],
) -> list[Block]:
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
                ("est. compute s", lambda r: fmt_pm(r.est_compute_seconds_mean, r.est_compute_seconds_std)),
                ("est. comm s", lambda r: _comm(r, r.est_comm_seconds_mean, r.est_comm_seconds_std)),
                ("est. total s", lambda r: fmt_pm(r.est_total_seconds_mean, r.est_total_seconds_std)),
                ("est. speedup (×)", lambda r: _speedup(r.est_speedup, r.est_speedup_std)),
                ("target", lambda r: _target_text(estimates, r.workload)),
                ("reached", lambda r: f"{r.est_target_reached}/{r.n_seeds}"),
                ("to target: compute s", lambda r: fmt(r.est_target_compute_seconds_mean)),
                ("to target: comm s", lambda r: _comm(r, r.est_target_comm_seconds_mean, math.nan)),
                (
                    "to target: total s",
                    lambda r: fmt_pm(r.est_target_total_seconds_mean, r.est_target_total_seconds_std),
                ),
            ],
        )
    )
    return [
        Heading(2, f"Estimated on cluster {name}"),
        Bullets(_cluster_lines(estimates)),
        *figure("pareto_est_time"),
        *figure("metric_vs_est_speedup"),
        table,
        *figure("metric_vs_est_time"),
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
                f"{fmt_pm(row['wall_seconds_mean'], row['wall_seconds_std'])} s. "
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
        ("lr", lambda r: fmt(r.lr)),
    ]
    if "engine" in study.group_keys:
        columns.append(("engine", lambda r: str(r.engine)))
    if "setting" in study.group_keys:
        columns.append(("setting", lambda r: str(r.setting)))
    return columns


def _speedup(mean: Any, std: Any) -> str:
    """Speedup ± its propagated std; the baseline itself is 1 by definition."""
    if mean == 1.0 and std == 0.0:
        return "1 (baseline)"
    return fmt_pm(mean, std)


def _comm(row: Any, mean: Any, std: Any) -> str:
    """A communication figure, or — for one worker, which communicates nothing."""
    return NOT_APPLICABLE if int(row.workers) == 1 else fmt_pm(mean, std)


def _summary_display(study: Study, summary: pd.DataFrame) -> Table:
    if summary.empty:
        return Table(["note"], [["no completed run: nothing to average"]])
    return frame_rows(
        summary,
        [
            *_key_columns(study),
            ("seeds", lambda r: str(r.n_seeds)),
            *_metric_columns(study, best=True, every=True),
            ("final train loss", lambda r: fmt_pm(r.final_train_loss_mean, r.final_train_loss_std)),
            ("wall time (s)", lambda r: fmt_pm(r.wall_seconds_mean, r.wall_seconds_std)),
            ("speedup (×)", lambda r: _speedup(r.speedup, r.speedup_std)),
            (
                "payload per worker",
                lambda r: NOT_APPLICABLE if int(r.workers) == 1 else fmt_bytes(r.bytes_mean, r.bytes_std),
            ),
            ("syncs", lambda r: NOT_APPLICABLE if int(r.workers) == 1 else fmt(r.syncs_mean)),
            ("samples/s", lambda r: fmt_pm(r.samples_per_second_mean, r.samples_per_second_std)),
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
