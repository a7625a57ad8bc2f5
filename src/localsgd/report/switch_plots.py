"""Post-local SGD's switch point in the report: the final primary metric against the switch
point t' (in epochs), one line per variant without t' (post-local SGD, SlowMo or DiLoCo
after a switch) and K, one panel per setting (the learning-rate schedule, when the study
varies it), with the synchronous baseline of the same K (mini-batch SGD, which never
switches) as a long-dashed line in a ± std band. Mean ± std over seeds as error bars
(Ortiz et al. 2021: "the switching point poses another trade-off"; "SlowMo consistently
improves accuracy, especially for early switch points").

The section (:mod:`~localsgd.report.sections.switch_point`) appears when some line has two
switch points or more (a sweep of t').
Conventions in :mod:`~localsgd.report.graphics`: one colour per algorithm family, no empty
panel, the figure in every format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure

from localsgd.records import Metric, Store
from localsgd.report.graphics import (
    BASELINE_LINE,
    LINESTYLES,
    MARKERS,
    add_entries,
    family_colors,
    grid,
    grid_size,
    labels_and_legend,
    sentence,
    stack,
    title_metric,
    workloads,
)
from localsgd.report.labels import switch_epochs, synchronous_baseline, without_switch
from localsgd.report.tables import Study, natural_key

DODGE = 0.012
"""Sideways step between lines in a panel, as a fraction of its switch-point range, so
that error bars at the same t' stay apart."""


def _configs(study: Study) -> dict[str, dict[str, Any]]:
    """Each finished run's config as recorded (the flattened columns of ``study.runs`` turn
    the whole numbers of a column with gaps into floats)."""
    store = Store(study.root, create=False)
    return {r.run_id: dict(r.config) for r in store.records() if not r.problem}


def switch_frame(study: Study) -> pd.DataFrame:
    """One row per completed run of an algorithm with a switch point (``switch`` in epochs),
    and per completed run of the synchronous baseline (``switch`` NaN): its workload,
    setting, K, B, family, ``line`` (variant without t') and final primary metric."""
    columns = ["workload", "setting", "workers", "batch_size", "algorithm", "line", "switch", "seed", "value"]
    rows = []
    configs = _configs(study)
    for run in study.runs[study.runs["status"] == "completed"].to_dict("records"):
        metric = study.primary(str(run["workload"]))
        config = configs.get(str(run["run_id"]))
        if metric is None or config is None:
            continue
        steps_per_epoch = float(run["final_step"]) / float(run["final_epoch"]) if run["final_epoch"] else 0.0
        switch = switch_epochs(config, steps_per_epoch)
        baseline = synchronous_baseline(str(run["algorithm"]))
        if switch is None and not baseline:
            continue
        rows.append(
            {
                "workload": str(run["workload"]),
                "setting": str(run.get("setting") or ""),
                "workers": int(run["workers"]),
                "batch_size": int(run["batch_size"]),
                "algorithm": str(run["algorithm"]),
                "line": without_switch(config),
                "switch": math.nan if switch is None else switch,
                "seed": run["seed"],
                "value": float(run.get(f"final_{metric.name}", math.nan)) * metric.scale,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def _sweeps(frame: pd.DataFrame) -> pd.DataFrame:
    """The switch runs of the lines that sweep t' (two switch points or more)."""
    runs = frame[frame["switch"].notna()]
    keys = ["workload", "setting", "workers", "batch_size", "line"]
    points = runs.groupby(keys)["switch"].transform("nunique")
    return runs[points > 1]


def has_sweep(frame: pd.DataFrame) -> bool:
    return not _sweeps(frame).empty


def _mean_std(values: pd.Series) -> tuple[float, float, int]:
    finite = values[values.notna()]
    std = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0
    return float(finite.mean()), std, len(finite)


def _seeds(counts: Sequence[int]) -> str:
    low, high = min(counts), max(counts)
    return f"n={low}" if low == high else f"n={low}–{high}"


def _panel(
    ax: Axes, sweeps: pd.DataFrame, baselines: pd.DataFrame, several_batches: bool, colors: dict[str, Any]
) -> tuple[list[Any], list[str]]:
    """One setting's lines (mean ± std per switch point) and baselines; legend entries."""
    handles: list[Any] = []
    labels: list[str] = []
    lines = sorted(
        sweeps.groupby(["algorithm", "line", "workers", "batch_size"]).groups,
        key=lambda k: (natural_key(str(k[0])), int(k[2]), int(k[3]), natural_key(str(k[1]))),
    )
    low, high = float(sweeps["switch"].min()), float(sweeps["switch"].max())
    span = high - low if high > low else 1.0
    per_family: dict[str, int] = {}
    for i, (family, line, workers, batch) in enumerate(lines):
        part = sweeps[
            (sweeps["algorithm"] == family)
            & (sweeps["line"] == line)
            & (sweeps["workers"] == workers)
            & (sweeps["batch_size"] == batch)
        ]
        points = [(x, *_mean_std(at["value"])) for x, at in part.groupby("switch")]
        member = per_family.get(family, 0)
        per_family[family] = member + 1
        shift = (i - (len(lines) - 1) / 2) * DODGE * span
        handle = ax.errorbar(
            [x + shift for x, *_ in points],
            [m for _, m, _, _ in points],
            yerr=[s for _, _, s, _ in points],
            color=colors[family],
            marker=MARKERS[member % len(MARKERS)],
            linestyle=LINESTYLES[member % len(LINESTYLES)],
            markersize=6,
            markeredgecolor="white",
            capsize=3,
            linewidth=1.4,
            zorder=3,
        )
        handles.append(handle)
        name = f"{line}, K={workers}" + (f", B={batch}" if several_batches else "")
        labels.append(f"{name} ({_seeds([n for *_, n in points])})")
    shown = {(int(w), int(b)) for _, _, w, b in lines}
    for (workers, batch), part in baselines.groupby(["workers", "batch_size"]):
        if (int(workers), int(batch)) not in shown:
            continue
        mean, std, n = _mean_std(part["value"])
        color = colors[str(part["algorithm"].iloc[0])]
        if std > 0:
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.12, linewidth=0, zorder=1)
        handles.append(ax.axhline(mean, color=color, zorder=2, **BASELINE_LINE))
        name = f"{part['line'].iloc[0]}, K={workers}" + (f", B={batch}" if several_batches else "")
        labels.append(f"baseline: {name}, never switches (n={n})")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(low - 0.08 * span, high + 0.08 * span)
    return handles, labels


def metric_vs_switch_point(frame: pd.DataFrame, metrics: dict[str, Metric]) -> MplFigure | None:
    """Per workload a row of panels, one per setting with a sweep of t'; None when no line
    sweeps t'."""
    sweeps = _sweeps(frame)
    shown = [w for w in workloads(sweeps) if w in metrics]
    if not shown:
        return None
    colors = family_colors(list(frame["algorithm"]))
    settings = {
        w: sorted(set(sweeps.loc[sweeps["workload"] == w, "setting"]), key=natural_key) for w in shown
    }
    lines = {
        w: sweeps[sweeps["workload"] == w].groupby(["setting", "line", "workers"]).ngroups for w in shown
    }
    sizes = [grid_size(len(settings[w]), lines[w] + len(settings[w])) for w in shown]
    title = sentence(f"final {title_metric({w: metrics[w] for w in shown})} against the switch point t'")
    fig, owners = stack(sizes, shown, len(workloads(frame)) > 1, title)
    for owner, workload in zip(owners, shown):
        mine = frame[frame["workload"] == workload]
        several_batches = mine["batch_size"].nunique() > 1
        axes = grid(owner, len(settings[workload]))
        handles: list[Any] = []
        labels: list[str] = []
        for ax, setting in zip(axes, settings[workload]):
            if setting:
                ax.set_title(setting, fontsize="medium")
            part = sweeps[(sweeps["workload"] == workload) & (sweeps["setting"] == setting)]
            base = mine[mine["switch"].isna() & (mine["setting"] == setting)]
            drawn = _panel(ax, part, base, several_batches, colors)
            add_entries(handles, labels, drawn)
        labels_and_legend(
            owner,
            "switch point t' (epochs of synchronous mini-batch SGD before local steps)",
            f"final {metrics[workload].heading}",
            handles,
            labels,
            "variant, workers K (seeds)",
        )
    return fig

