"""The figures: bands from the std over seeds, error bars on both axes, one colour per family,
no marker hidden by another, robust metric axes, readable log ticks, no empty panel."""

from __future__ import annotations

import colorsys
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from localsgd.records import Metric
from localsgd.report import curve_plots, graphics, plots
from localsgd.report.tables import curves, load, summary_table

pd = pytest.importorskip("pandas")
matplotlib = pytest.importorskip("matplotlib")

from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

# One xdist worker runs this module, so conftest's session report is built once per session, not once per worker.
pytestmark = pytest.mark.xdist_group("report_build")

ACCURACY = Metric("accuracy", "test accuracy", "%", True, 100.0)
METRICS = {"w": ACCURACY}


def summary(rows: list[tuple[str, str, int, float, float, float, float]]) -> pd.DataFrame:
    """(group, family, K, speedup, speedup std, accuracy, accuracy std) per group."""
    return pd.DataFrame(
        [
            {
                "workload": "w",
                "group": group,
                "algorithm": family,
                "workers": k,
                "n_seeds": 3,
                "speedup": s,
                "speedup_std": s_std,
                "final_accuracy_mean": acc,
                "final_accuracy_std": acc_std,
                "bytes_mean": 1000.0 * k,
                "bytes_std": 0.0,
                "period": 1,
            }
            for group, family, k, s, s_std, acc, acc_std in rows
        ]
    )


def marker_points(ax: Any) -> list[tuple[float, float]]:
    """Data coordinates of the markers drawn on ``ax`` (lines with a marker, one point)."""
    out = []
    for line in ax.get_lines():
        xs, ys = line.get_xdata(), line.get_ydata()
        if line.get_marker() not in (None, "None", "", " ", "_", "|") and len(xs) == 1:  # not a cap
            out.append((float(xs[0]), float(ys[0])))
    return out


def visible_axes(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_visible()]


def test_curves_carry_the_std_over_seeds(report: tuple[Path, dict[str, Path]]) -> None:
    root, _ = report
    study = load(root)
    frame = curves(study)
    assert {"accuracy_std", "train_loss_std", "wall_seconds_std", "n"} <= set(frame.columns)
    last = frame[(frame["group"].str.startswith("local_sgd H=4")) & (frame["step"] == 200)].iloc[0]
    rows = study.metrics.merge(study.runs[["run_id", "variant", "status"]], on="run_id")
    done = rows[
        (rows["variant"] == "local_sgd H=4") & (rows["status"] == "completed") & (rows["step"] == 200)
    ]
    assert last["n"] == 3
    assert last["accuracy"] == pytest.approx(statistics.mean(done["accuracy"]))
    assert last["accuracy_std"] == pytest.approx(statistics.stdev(done["accuracy"]))
    assert last["train_loss_std"] == pytest.approx(statistics.stdev(done["train_loss"]))


def test_curves_are_drawn_in_bands_and_points_with_both_error_bars(
    report: tuple[Path, dict[str, Path]],
) -> None:
    root, _ = report
    study = load(root)
    table = summary_table(study)
    frame = curves(study)
    look = graphics.styles(table)
    metrics = {w: m for w in study.declared if (m := study.primary(w)) is not None}
    fig = curve_plots.metric_vs_epochs(frame, look, metrics).figure
    assert fig is not None
    (ax,) = visible_axes(fig)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(table)  # one band per group
    # A band is mean ± std: its top edge at the last step is the mean plus the std.
    last = frame[(frame["group"].str.startswith("local_sgd H=4")) & (frame["step"] == 200)].iloc[0]
    tops = [band.get_paths()[0].vertices[:, 1].max() for band in bands]
    assert any(t == pytest.approx(100 * (last["accuracy"] + last["accuracy_std"])) for t in tops)

    fig = plots.metric_vs_speedup(table, look, metrics).figure
    assert fig is not None
    (ax,) = visible_axes(fig)
    containers = [c for c in ax.containers if c.has_xerr and c.has_yerr]
    assert containers, "speedup has horizontal and vertical error bars"
    # Every figure gives a group the same colour: the curves and the points use the same set.
    drawn = curve_plots.metric_vs_epochs(frame, look, metrics).figure
    assert drawn is not None
    line_colors = {matplotlib.colors.to_hex(line.get_color()) for line in visible_axes(drawn)[0].get_lines()}
    point_colors = {matplotlib.colors.to_hex(c.lines[0].get_color()) for c in ax.containers}
    assert line_colors == point_colors == {matplotlib.colors.to_hex(s.color) for s in look.values()}


def test_one_hue_per_family_and_markers_tell_members_apart() -> None:
    table = summary(
        [
            ("local_sgd H=4, K=4", "local_sgd", 4, 1.2, 0.1, 0.96, 0.003),
            ("local_sgd H=16, K=4", "local_sgd", 4, 1.9, 0.1, 0.955, 0.003),
            ("local_sgd H=64, K=4", "local_sgd", 4, 2.1, 0.1, 0.94, 0.003),
            ("slowmo H=16, K=4", "slowmo", 4, 1.8, 0.1, 0.954, 0.003),
            ("minibatch_sgd, K=1", "minibatch_sgd", 1, 1.0, 0.0, 0.978, 0.003),
        ]
    )
    look = graphics.styles(table)
    hue = {g: colorsys.rgb_to_hsv(*matplotlib.colors.to_rgb(s.color))[0] for g, s in look.items()}
    local = [g for g in look if g.startswith("local_sgd")]
    assert max(hue[g] for g in local) - min(hue[g] for g in local) < 0.01
    assert len({look[g].color for g in local}) == 3 and len({look[g].marker for g in local}) == 3
    assert abs(hue["slowmo H=16, K=4"] - hue[local[0]]) > 0.05
    # The family colour is the registry's: the same in any study that has the family.
    alone = graphics.styles(table[table["algorithm"] == "slowmo"])
    assert alone["slowmo H=16, K=4"].color == look["slowmo H=16, K=4"].color


def test_coinciding_points_become_one_panel_per_family() -> None:
    # Mini-batch SGD at K=4 and SMA lie on top of each other.
    table = summary(
        [
            ("minibatch_sgd, K=1", "minibatch_sgd", 1, 1.0, 0.0, 0.978, 0.003),
            ("minibatch_sgd, K=4", "minibatch_sgd", 4, 0.61, 0.05, 0.9664, 0.0006),
            ("sma, K=4", "sma", 4, 0.60, 0.05, 0.9662, 0.0014),
            ("local_sgd H=16, K=4", "local_sgd", 4, 1.92, 0.3, 0.9561, 0.0023),
        ]
    )
    look = graphics.styles(table)
    fig = plots.metric_vs_speedup(table, look, METRICS).figure
    assert fig is not None
    axes = visible_axes(fig)
    assert sorted(ax.get_title() for ax in axes) == ["LocalSGD", "MiniBatchSGD", "SMA"]
    assert not any("_" in ax.get_title() for ax in axes)
    # Apart, the same points fit one panel.
    apart = table.copy()
    apart.loc[apart["group"] == "sma, K=4", "speedup"] = 1.5
    fig = plots.metric_vs_speedup(apart, graphics.styles(apart), METRICS).figure
    assert fig is not None and len(visible_axes(fig)) == 1


def test_points_at_the_same_x_are_dodged_apart() -> None:
    # Local SGD H=16, SlowMo and DiLoCo send the same bytes; H·K is the same too.
    table = summary(
        [
            ("diloco H=16, K=4", "diloco", 4, 1.8, 0.1, 0.93, 0.01),
            ("local_sgd H=16, K=4", "local_sgd", 4, 1.9, 0.1, 0.956, 0.002),
            ("slowmo H=16, K=4", "slowmo", 4, 1.85, 0.1, 0.955, 0.004),
        ]
    )
    table["bytes_mean"] = 664_000.0
    table["period"] = 16
    look = graphics.styles(table)
    for plot in (
        plots.metric_vs_bytes(table, look, METRICS),
        plots.metric_vs_period_workers(table, look, METRICS),
    ):
        assert plot.figure is not None
        (ax,) = visible_axes(plot.figure)
        xs = sorted(x for x, _ in marker_points(ax))
        assert len(xs) == 3 and xs[0] < xs[1] < xs[2]
        log = [math.log(x) for x in xs]
        true = math.log(664_000.0 if ax.get_xscale() == "log" and xs[1] > 1000 else 64.0)
        assert log[1] == pytest.approx(true) and log[2] - log[1] == pytest.approx(log[1] - log[0])


def test_an_outlier_does_not_stretch_the_metric_axis() -> None:
    rows = [
        (f"local_sgd H={h}, K=4", "local_sgd", 4, 1.0 + h / 10, 0.1, 0.96 - h / 1000, 0.002)
        for h in (1, 2, 4, 8, 16)
    ]
    rows.append(("gradient_accumulation k=4, K=4", "gradient_accumulation", 4, 1.26, 0.1, 0.8193, 0.0085))
    table = summary(rows)
    fig = plots.metric_vs_speedup(table, graphics.styles(table), METRICS).figure
    assert fig is not None
    (ax,) = visible_axes(fig)
    low, high = ax.get_ylim()
    assert low > 93 and high < 97  # 94.4..95.9 % ± 0.2, not stretched down to 81.9 %
    edge = [line for line in ax.get_lines() if line.get_marker() == "v"]
    assert len(edge) == 1 and low <= edge[0].get_ydata()[0] < low + 0.1 * (high - low)
    assert any(t.get_text().startswith("81.9 ± 0.9 %") for t in ax.texts)


@pytest.mark.parametrize(
    ("values", "low", "high"),
    [
        ([96.1, 96.2, 95.5, 95.6, 81.9, 96.6, 97.8, 95.9, 92.9, 96.2], {4}, set()),
        ([35.0, 34.8, 63.1, 63.6, 65.3, 66.6, 67.8, 68.6, 70.0], {0, 1}, set()),
        ([0.1, 0.2, 0.3, 5.0], set(), {3}),
        ([1.0, 2.0, 3.0, 4.0, 5.0], set(), set()),
        ([1.0, 1.0, 1.0, 9.0], set(), set()),  # nothing left to show once it is out
        ([1.0, 9.0, 10.0], set(), set()),  # too few to tell
    ],
)
def test_outliers(values: list[float], low: set[int], high: set[int]) -> None:
    assert plots.outliers(values) == (low, high)


def test_log_axes_have_few_plain_labels() -> None:
    table = summary(
        [
            (f"local_sgd H={h}, K=4", "local_sgd", 4, 1.0, 0.1, 0.96 - h / 1000, 0.002)
            for h in (1, 2, 4, 8, 16, 32)
        ]
    )
    table["bytes_mean"] = [10_000_000 / h for h in (1, 2, 4, 8, 16, 32)]
    table["period"] = [1, 2, 4, 8, 16, 32]
    look = graphics.styles(table)
    for plot, allowed in (
        (plots.metric_vs_bytes(table, look, METRICS), {"200 kB", "500 kB", "1 MB", "2 MB", "5 MB", "10 MB"}),
        (plots.metric_vs_period_workers(table, look, METRICS), {"4", "8", "16", "32", "64", "128"}),
    ):
        assert plot.figure is not None
        (ax,) = visible_axes(plot.figure)
        plot.figure.canvas.draw()
        low, high = ax.get_xlim()
        visible = [
            t.get_text() for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high
        ]
        assert set(visible) <= allowed and 3 <= len(visible) <= 8, visible


def test_no_baseline_means_no_speedup_figure_and_a_reason() -> None:
    table = summary([("local_sgd H=4, K=4", "local_sgd", 4, math.nan, math.nan, 0.95, 0.01)])
    look = graphics.styles(table)
    for plot in (plots.metric_vs_speedup(table, look, METRICS), plots.pareto_speedup(table, look, METRICS)):
        assert plot.figure is None
        assert plot.left_out == {"w": "no completed K=1 run to measure speedup against"}


@pytest.mark.parametrize(
    ("xs", "x_higher", "front"),
    [
        # Speedup, higher is better: (1.2, 95.0) and (1.5, 96.0) are beaten by (1.5, 96.6).
        ([1.0, 1.5, 1.2, 2.0, 1.5], True, [True, True, False, True, False]),
        # Time, lower is better: (5, 95.0) and (8, 96.6) are beaten by (5, 96.6).
        ([10.0, 5.0, 20.0, 5.0, 8.0], False, [True, True, True, False, False]),
    ],
)
def test_pareto_front(xs: list[float], x_higher: bool, front: list[bool]) -> None:
    ys = [
        97.8,
        96.6,
        98.0 if not x_higher else 95.0,
        95.0 if not x_higher else 95.5,
        96.6 if not x_higher else 96.0,
    ]
    assert plots.pareto_front(xs, ys, x_higher, True) == front


def test_pareto_figure_draws_its_front() -> None:
    table = summary(
        [
            ("minibatch_sgd, K=1", "minibatch_sgd", 1, 1.0, 0.0, 0.978, 0.003),
            ("local_sgd H=4, K=4", "local_sgd", 4, 1.5, 0.1, 0.966, 0.003),
            ("sma, K=4", "sma", 4, 1.2, 0.1, 0.950, 0.003),
            ("local_sgd H=16, K=4", "local_sgd", 4, 2.0, 0.2, 0.955, 0.003),
        ]
    )
    fig = plots.pareto_speedup(table, graphics.styles(table), METRICS).figure
    assert fig is not None
    (ax,) = visible_axes(fig)
    (front,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    # A staircase through (1, 97.8), (1.5, 96.6), (2, 95.5): the edge of what they dominate.
    xs, ys = front.get_xdata(), front.get_ydata()
    assert list(xs) == [1.0, 1.5, 2.0] and list(ys) == pytest.approx([97.8, 96.6, 95.5])
    assert front.get_drawstyle() == "steps-pre"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "sma, K=4 (n=3), dominated" in labels and "local_sgd H=4, K=4 (n=3)" in labels
    assert isinstance(front, Line2D)
    title = fig.get_suptitle()
    assert title.startswith("Pareto front: final test accuracy") and "_" not in title


def test_the_hk_view_joins_the_points_of_each_k_by_a_line() -> None:
    rows = [
        (f"local_sgd H={h}, K={k}", "local_sgd", k, 1.0, 0.1, 0.97 - 0.001 * h * k / 16, 0.002)
        for k in (4, 16)
        for h in (1, 4, 16)
    ]
    table = summary([*rows, ("slowmo H=16, K=16", "slowmo", 16, 1.0, 0.1, 0.9, 0.01)])
    table["period"] = [1, 4, 16, 1, 4, 16, 16]
    plot = plots.metric_vs_period_workers(table, graphics.styles(table), METRICS)
    assert plot.figure is not None
    lines = [ln for ax in visible_axes(plot.figure) for ln in ax.get_lines() if len(ln.get_xdata()) > 1]
    # One line per K through its H·K points (dodged sideways where another K shares an
    # H·K, as the markers are), in order of H·K; the lone SlowMo point gets none.
    drawn = sorted((tuple(round(math.log2(x)) for x in ln.get_xdata()), list(ln.get_ydata())) for ln in lines)
    assert [xs for xs, _ in drawn] == [(2, 4, 6), (4, 6, 8)]
    assert drawn[0][1] == pytest.approx([96.975, 96.9, 96.6]) and drawn[1][1] == pytest.approx(
        [96.9, 96.6, 95.4]
    )
    legend = [t.get_text() for t in plot.figure.legends[0].get_texts()]
    assert "line: local_sgd, K=4" in legend and "line: local_sgd, K=16" in legend
