"""The switch-point figure (post-local SGD with and without SlowMo against t', per schedule,
the synchronous baseline dashed) and the synchronous baseline of each K in the H·K figure,
from hand-built stores; neither appears without the runs it needs."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from localsgd.records import Metric, Store
from localsgd.report import graphics, make_report, plots
from localsgd.report.build import context
from localsgd.report.labels import line_variant, variant_label, without_switch
from localsgd.report.section import Parts
from localsgd.report.sections import switch_point
from localsgd.report.sections.switch_point import STEM
from localsgd.report.switch_plots import metric_vs_switch_point, switch_frame
from localsgd.report.tables import load, summary_table
from report.records import write_run
from report.stores import config_of, rows_of, run_id_of

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

ACCURACY = Metric("accuracy", "test accuracy", "%", True, 100.0)
SWITCHES = (0.5, 1.0, 2.0)
POST_LOCAL = {"name": "post_local_sgd", "period": 4}
SLOWMO = {"name": "slowmo", "period": 4, "outer_momentum": 0.5, "outer_lr": 1.0}


def accuracy(family: str, schedule: str, switch: float | None, seed: int) -> float:
    """A final accuracy per run: SlowMo above post-local SGD, later switches higher, the
    half-cosine schedule lower, seeds apart."""
    base = 0.90 if switch is None else 0.80 + 0.02 * switch + (0.03 if family == "slowmo" else 0.0)
    return base - (0.05 if schedule == "half_cosine" else 0.0) + 0.01 * seed


def write(store: Store, algorithm: dict[str, Any], schedule: str, seed: int, workers: int = 4) -> None:
    config = config_of(algorithm, workers, seed)
    config["schedule"]["name"] = schedule
    switch = algorithm.get("switch_epoch")
    if "switch_step" in algorithm:
        switch = algorithm["switch_step"] / 50  # the synthetic rows take 50 steps per epoch
    acc = accuracy(algorithm["name"], schedule, switch, seed)
    rows = rows_of(algorithm, workers, seed, "completed", 50.0, acc)
    assert write_run(store, run_id_of(config), config, rows, "completed") == "completed"


def build_switch_store(root: Path, switches: tuple[float, ...] = SWITCHES) -> Store:
    """Post-local SGD and SlowMo at each switch point, and mini-batch SGD, under two
    schedules, two seeds each, K = 4; one SlowMo sweep gives its switch in steps."""
    store = Store(root)
    for schedule in ("step", "half_cosine"):
        for seed in (0, 1):
            write(store, {"name": "minibatch_sgd"}, schedule, seed)
            for t in switches:
                write(store, {**POST_LOCAL, "switch_epoch": t}, schedule, seed)
                slowmo = (
                    {**SLOWMO, "switch_step": int(t * 50)}
                    if schedule == "step"
                    else {**SLOWMO, "switch_epoch": t}
                )
                write(store, slowmo, schedule, seed)
    return store


def data_lines(ax: Any) -> list[Any]:
    """The lines through the switch points (not the error bars' caps, drawn without one)."""
    return [
        ln for ln in ax.get_lines() if len(ln.get_xdata()) == len(SWITCHES) and ln.get_linestyle() != "None"
    ]


def test_one_panel_per_schedule_one_line_per_variant_with_mean_and_std(tmp_path: Path) -> None:
    build_switch_store(tmp_path / "store")
    frame = switch_frame(load(tmp_path / "store"))
    # Switch points in epochs, from switch_epoch or from switch_step over steps per epoch.
    assert sorted(set(frame["switch"].dropna())) == list(SWITCHES)
    fig = metric_vs_switch_point(frame, {"mnist1d_cnn": ACCURACY})
    assert fig is not None
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["schedule.name=half_cosine", "schedule.name=step"]
    colors = graphics.family_colors(["minibatch_sgd", "post_local_sgd", "slowmo"])
    for ax, schedule in zip(axes, ("half_cosine", "step")):
        lines = {tuple(round(c, 3) for c in ln.get_color()): ln for ln in data_lines(ax)}
        assert len(lines) == 2  # post-local SGD and SlowMo, each its family's colour
        for family in ("post_local_sgd", "slowmo"):
            line = lines[tuple(round(float(c), 3) for c in colors[family])]
            want = [100 * statistics.mean(accuracy(family, schedule, t, s) for s in (0, 1)) for t in SWITCHES]
            assert list(line.get_ydata()) == pytest.approx(want)
            # Dodged sideways by a sliver of the range, never onto another switch point.
            assert [round(x, 1) for x in line.get_xdata()] == pytest.approx(list(SWITCHES), abs=0.05)
        # Error bars: ± the std over the two seeds (1 point apart: std = 0.707 points).
        caps = [
            seg
            for coll in ax.collections
            if hasattr(coll, "get_segments")
            for seg in coll.get_segments()
            if len(seg) == 2 and seg[0][0] == seg[1][0]
        ]
        assert caps and all(
            abs(seg[1][1] - seg[0][1]) == pytest.approx(2 * 100 * 0.01 / math.sqrt(2)) for seg in caps
        )
        # The baseline: mini-batch SGD's mean, dashed, across the panel.
        dashed = [ln for ln in ax.get_lines() if ln.get_gid() == "baseline"]
        assert len(dashed) == 1
        base = 100 * statistics.mean(accuracy("minibatch_sgd", schedule, None, s) for s in (0, 1))
        assert list(dashed[0].get_ydata()) == pytest.approx([base, base])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [
        "post_local_sgd H=4, K=4 (n=2)",
        "slowmo H=4 μ=0.5 η=1, K=4 (n=2)",
        "baseline: minibatch_sgd, K=4, never switches (n=2)",
    ]
    assert fig.get_suptitle() == "Final test accuracy against the switch point t'"


def test_the_report_draws_it_in_every_format_with_its_section(tmp_path: Path) -> None:
    build_switch_store(tmp_path / "store")
    paths = make_report(tmp_path / "store", tmp_path / "report")
    assert {f"{STEM}.png", f"{STEM}.pdf", f"{STEM}.svg"} <= {p.name for p in paths.values()}
    text = paths["markdown"].read_text()
    assert "## Switch point" in text and f"({STEM}.png)" in text
    assert text.index("## Switch point") < text.index("## Run status")


def test_no_figure_without_a_sweep_of_switch_points(
    tmp_path: Path, report: tuple[Path, dict[str, Path]]
) -> None:
    # The shared synthetic store: no algorithm with a switch point at all.
    _, paths = report
    assert not any(p.name.startswith(STEM) for p in paths.values())
    assert "## Switch point" not in paths["markdown"].read_text()
    # One switch point per variant is no sweep either.
    build_switch_store(tmp_path / "one", switches=(1.0,))
    frame = switch_frame(load(tmp_path / "one"))
    assert len(frame) == 12 and metric_vs_switch_point(frame, {"mnist1d_cnn": ACCURACY}) is None
    assert switch_point.parts(context(tmp_path / "one")) == Parts()


# -- the H·K figure's synchronous baseline -------------------------------------------------


def test_the_hk_view_marks_minibatch_sgd_at_each_k_and_keeps_switch_points_apart(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    runs: list[tuple[dict[str, Any], int, float]] = [
        ({"name": "minibatch_sgd"}, k, 0.95 - 0.01 * k) for k in (2, 8)
    ]
    runs += [({"name": "local_sgd", "period": h}, k, 0.94 - 0.001 * h * k) for k in (2, 8) for h in (2, 8)]
    runs += [({**POST_LOCAL, "period": 8, "switch_epoch": t}, 8, 0.9 + 0.01 * t) for t in SWITCHES]
    for algorithm, k, acc in runs:
        for seed in (0, 1):
            config = config_of(algorithm, k, seed)
            rows = rows_of(algorithm, k, seed, "completed", 50.0, acc + 0.002 * seed)
            write_run(store, run_id_of(config), config, rows, "completed")
    summary = summary_table(load(store.root))
    plot = plots.metric_vs_period_workers(summary, graphics.styles(summary), {"mnist1d_cnn": ACCURACY})
    assert plot.figure is not None
    axes = [ax for ax in plot.figure.axes if ax.get_visible()]
    dashed = [ln for ax in axes for ln in ax.get_lines() if ln.get_gid() == "baseline"]
    # Per K: from mini-batch SGD's point (H = 1) across that K's local SGD points, at its mean.
    spans = sorted(
        (round(math.log2(min(ln.get_xdata()))), round(math.log2(max(ln.get_xdata()))), ln.get_ydata()[0])
        for ln in dashed
    )
    assert [(lo, hi) for lo, hi, _ in spans] == [(1, 4), (3, 6)]
    assert [y for *_, y in spans] == pytest.approx([100 * (0.93 + 0.001), 100 * (0.87 + 0.001)])
    legend = [t.get_text() for t in plot.figure.legends[0].get_texts()]
    assert "baseline: minibatch_sgd, K=2" in legend and "baseline: minibatch_sgd, K=8" in legend
    # Post-local SGD at three switch points shares H·K = 64: three points, no line through them.
    assert "line: local_sgd, K=8" in legend
    assert not any(label.startswith("line: post_local_sgd") for label in legend)


@pytest.mark.parametrize(
    "algorithm,label,line,plain",
    [
        (SLOWMO, "slowmo H=4 μ=0.5 η=1", "slowmo μ=0.5 η=1", "slowmo H=4 μ=0.5 η=1"),
        (
            {**SLOWMO, "switch_step": 200},
            "slowmo H=4 μ=0.5 η=1 t'=200",
            "slowmo μ=0.5 η=1 t'=200",
            "slowmo H=4 μ=0.5 η=1",
        ),
        (
            {**SLOWMO, "switch_epoch": 2.5},
            "slowmo H=4 μ=0.5 η=1 t'=2.5ep",
            "slowmo μ=0.5 η=1 t'=2.5ep",
            "slowmo H=4 μ=0.5 η=1",
        ),
        (
            {"name": "diloco", "switch_epoch": 1},
            "diloco H=500 η=0.7 μ=0.9 t'=1ep",
            "diloco η=0.7 μ=0.9 t'=1ep",
            "diloco H=500 η=0.7 μ=0.9",
        ),
        (
            {**POST_LOCAL, "switch_epoch": 2.5},
            "post_local_sgd t'=2.5ep H=4",
            "post_local_sgd t'=2.5ep",
            "post_local_sgd H=4",
        ),
        ({"name": "minibatch_sgd"}, "minibatch_sgd", "minibatch_sgd", "minibatch_sgd"),
    ],
)
def test_labels_name_the_switch_point_only_where_one_is_set(algorithm, label, line, plain) -> None:
    config = {"algorithm": algorithm}
    assert variant_label(config) == label
    assert line_variant(config) == line  # the H·K view's line: the variant without H
    assert without_switch(config) == plain  # the switch-point view's line
