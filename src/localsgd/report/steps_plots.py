"""Figures of steps-to-result (:mod:`~localsgd.report.steps`): steps against the global batch
K·B on log-log axes with the perfect-scaling line and the regimes, the same normalised by
the smallest batch, the best metaparameters against the batch, and local SGD's steps and
communication rounds against K·B, one line per variant (H). Conventions in
:mod:`~localsgd.report.graphics`: one colour per algorithm family (its curves in shades),
plain log ticks, no empty panel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure, SubFigure
from matplotlib.lines import Line2D

from localsgd.report.graphics import Plot, Style, legend, log_ticks, sentence, stack, styles, workloads
from localsgd.report.steps import REGIMES

REGIME_LINES: dict[str, Any] = dict(zip(REGIMES, ("-", "--", ":")))
"""A segment's line style by the regime of the batch it ends at."""
REFERENCE: dict[str, Any] = {"color": "0.45", "linestyle": "-.", "linewidth": 0.9}
"""The perfect-scaling line: steps ∝ 1/(K·B) from a curve's smallest batch."""
XLABEL = "global batch K·B (log₂ scale)"


def _looks(table: pd.DataFrame) -> dict[str, Style]:
    """A style per curve: its family's colour, shaded over the family's curves."""
    return styles(pd.DataFrame({"algorithm": table["algorithm"].astype(str), "group": table["curve"]}))


def _log_axes(ax: Axes, xs: list[float], ys: list[float], ybase: int = 10) -> None:
    ax.set_xscale("log", base=2)
    log_ticks(ax.xaxis, 2, "plain", math.log10(max(xs) / min(xs)) if xs else 1.0)
    ax.set_yscale("log", base=ybase)
    low, high = (min(ys), max(ys)) if ys else (1.0, 10.0)
    ax.set_ylim(low / 1.6, high * 1.6)
    log_ticks(ax.yaxis, ybase, "plain", math.log10(high * 1.6 / (low / 1.6)))
    ax.grid(True, which="major", alpha=0.3)


def _curve(ax: Axes, curve: pd.DataFrame, y: pd.Series, style: Style, *, regimes: bool) -> Any:
    """Markers at the batches that reached the target; segments between neighbours in the
    regime's line style (or the curve's own, without regimes); on the steps themselves,
    error bars of ± the std over the best trial's seeds."""
    ok = curve.assign(y=y)[y.notna() & (y > 0)]
    xs, ys = list(ok["global_batch"].astype(float)), list(ok["y"].astype(float))
    for i in range(1, len(xs)):
        linestyle = REGIME_LINES.get(str(ok["regime"].iloc[i]), "-") if regimes else style.linestyle
        ax.plot(xs[i - 1 : i + 1], ys[i - 1 : i + 1], color=style.color, linestyle=linestyle, linewidth=1.5)
    if "steps_std" in ok.columns and ok["y"].equals(ok["steps"].astype(float)):
        spread = ok["steps_std"].astype(float).fillna(0.0)
        if (spread > 0).any():
            ax.errorbar(xs, ys, yerr=list(spread), color=style.color, linestyle="none", capsize=3, zorder=1)
    return ax.plot(
        xs,
        ys,
        marker=style.marker,
        color=style.color,
        linestyle="none",
        markersize=6,
        markeredgecolor="white",
    )[0]


def _panels(
    table: pd.DataFrame,
    columns: list[tuple[str, Callable[[pd.DataFrame], pd.Series], str, bool]],
    *,
    title: str,
    why_empty: str,
    reference: bool = False,
    regimes: bool = False,
) -> Plot:
    """Per workload a row of panels, one per (name, y of a curve, y label, log y) column;
    each curve of the workload a line against K·B."""
    left_out: dict[str, str] = {}
    blocks = []
    for workload in workloads(table):
        part = table[table["workload"] == workload]
        if not part["steps"].notna().any():
            left_out[workload] = why_empty
            continue
        blocks.append((workload, part))
    if not blocks:
        return Plot(None, left_out)
    look = _looks(table)
    legend_entries = len(look) + (len(REGIMES) if regimes else 0) + int(reference)
    width = 4.4 * len(columns) + 3.8
    fig, owners = stack(
        [(width, 3.9 + 0.1 * max(0, legend_entries - 8))] * len(blocks),
        [b[0] for b in blocks],
        len(workloads(table)) > 1,
        sentence(title),
    )
    for owner, (_, part) in zip(owners, blocks):
        _draw_block(owner, part, columns, look, reference=reference, regimes=regimes)
    return Plot(fig, left_out)


def _draw_block(
    owner: Figure | SubFigure,
    part: pd.DataFrame,
    columns: list[tuple[str, Callable[[pd.DataFrame], pd.Series], str, bool]],
    look: dict[str, Style],
    *,
    reference: bool,
    regimes: bool,
) -> None:
    axes = list(owner.subplots(1, len(columns), squeeze=False)[0])
    handles: dict[str, Any] = {}
    for ax, (name, y_of, ylabel, log_y) in zip(axes, columns):
        xs, ys = [], []
        for label, curve in part.groupby("curve", sort=False):
            y = y_of(curve)
            if not (y.notna() & (y > 0)).any():
                continue
            handles[str(label)] = _curve(ax, curve, y, look[str(label)], regimes=regimes)
            ok = curve[y.notna() & (y > 0)]
            xs += list(ok["global_batch"].astype(float))
            ys += list(y[y.notna() & (y > 0)].astype(float))
            if reference:
                x0, y0 = float(ok["global_batch"].iloc[0]), float(y[y.notna() & (y > 0)].iloc[0])
                ends = [x0, float(curve["global_batch"].max())]
                ax.plot(ends, [y0 * x0 / x for x in ends], **REFERENCE)
        if not xs:
            ax.set_visible(False)
            continue
        if log_y:
            _log_axes(ax, xs, ys)
        else:
            _log_axes(ax, xs, [1.0])
            ax.set_yscale("linear")
            ax.set_ylim(min(0.0, min(ys)), max(1.0, max(ys)) * 1.05)
        ax.set_xlabel(XLABEL)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize="medium")
    extra_handles: list[Any] = []
    extra_labels: list[str] = []
    if regimes:
        for regime, linestyle in REGIME_LINES.items():
            extra_handles.append(Line2D([], [], color="0.2", linestyle=linestyle))
            extra_labels.append(f"segment: {regime}")
    if reference:
        extra_handles.append(Line2D([], [], **REFERENCE))
        extra_labels.append("perfect scaling (steps ∝ 1/(K·B))")
    legend(owner, [*handles.values(), *extra_handles], [*handles, *extra_labels], "curve")


def _steps(curve: pd.DataFrame) -> pd.Series:
    return curve["steps"].astype(float)


def _normalised(curve: pd.DataFrame) -> pd.Series:
    steps = curve["steps"].astype(float)
    first = steps[steps.notna() & (steps > 0)]
    return steps / float(first.iloc[0]) if len(first) else steps


def _with_regimes(
    table: pd.DataFrame, y_of: Callable[[pd.DataFrame], pd.Series], ylabel: str, title: str
) -> Plot:
    name = ylabel.split(" (")[0]
    return _panels(
        table,
        [(name, y_of, ylabel, True)],
        title=title,
        why_empty="no trial reached the target",
        reference=True,
        regimes=True,
    )


def steps_to_result(table: pd.DataFrame) -> Plot:
    """Steps-to-result against K·B (log-log) with the perfect-scaling line and regimes."""
    return _with_regimes(
        table,
        _steps,
        "steps to result (log scale)",
        "Steps to reach the target against the global batch (the best trial's mean ± std over its seeds)",
    )


def steps_normalised(table: pd.DataFrame) -> Plot:
    """The same, each curve divided by its steps at its smallest batch."""
    return _with_regimes(
        table,
        _normalised,
        "steps / steps at the smallest batch (log scale)",
        "Steps to result normalised by the smallest batch of each curve",
    )


def best_metaparameters(table: pd.DataFrame) -> Plot:
    """The best trial's learning rate and momentum against K·B."""
    columns: list[tuple[str, Callable[[pd.DataFrame], pd.Series], str, bool]] = [
        (
            "learning rate",
            lambda c: c["best_lr"].astype(float).where(c["steps"].notna()),
            "best learning rate (log scale)",
            True,
        )
    ]
    if table["best_momentum"].astype(float).fillna(0).gt(0).any():
        columns.append(
            (
                "momentum",
                lambda c: c["best_momentum"].astype(float).where(c["steps"].notna()),
                "best momentum",
                False,
            )
        )
    return _panels(
        table,
        columns,
        title="The best trial's metaparameters against the global batch",
        why_empty="no trial reached the target",
    )


def local_sgd_steps(table: pd.DataFrame) -> Plot:
    """Algorithms with a period H at K > 1: optimizer steps and communication rounds to the
    target against the effective batch K·B, one line per variant (H)."""
    part = table[table["period"].notna() & (table["workers"].astype(int) > 1)]
    if part.empty:
        return Plot(None, {w: "no run of K>1 workers with a period H" for w in workloads(table)})
    return _panels(
        part,
        [
            ("optimizer steps", _steps, "optimizer steps to result (log scale)", True),
            (
                "communication rounds",
                lambda c: c["rounds"].astype(float),
                "communication rounds to result (log scale)",
                True,
            ),
        ],
        title="Local SGD: steps and communication rounds to the target against the effective batch K·B",
        why_empty="no trial of K>1 workers reached the target",
        reference=True,
    )
