"""The "Accuracy against cost" section: it appears when a study varies streaming or
compression, marks the right configurations as on the Pareto fronts, and writes its figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from localsgd.records import Metric, Store
from localsgd.report import make_report
from localsgd.report.build import context
from localsgd.report.render import Paragraph, Table
from localsgd.report.sections import tradeoffs
from localsgd.report.sections.tradeoffs import SLOW_CLUSTER, fronts, varied_keys
from report.records import write_run
from report.stores import build_estimate_store, config_of, est_rows, run_id_of

ACC = Metric("accuracy", "test accuracy", unit="%", scale=100.0, higher_is_better=True)
HEADING = "Accuracy against cost"

PLAIN = {"name": "local_sgd", "period": 4}
MIXED = {"name": "local_sgd", "period": 4, "mixing": 0.5}
STREAMED = {"name": "local_sgd", "period": 8, "fragments": 2, "overlap": 1}
# (algorithm, workers, seeds, wall seconds, final accuracy): the streamed variant syncs half
# as often (cheaper, less accurate), the mixed one costs what the plain one does and is less
# accurate, so it is dominated on both fronts.
VARIANTS: list[tuple[dict[str, Any], int, tuple[int, ...], float, float]] = [
    ({"name": "minibatch_sgd"}, 1, (0, 1), 200.0, 0.92),
    (PLAIN, 4, (0, 1), 60.0, 0.88),
    (MIXED, 4, (0, 1), 60.0, 0.85),
    (STREAMED, 4, (0, 1), 60.0, 0.84),
]


def test_the_front_of_hand_made_points_keeps_what_nothing_beats_on_both_axes():
    summary = pd.DataFrame(
        {
            "workload": ["w"] * 6,
            "bytes_mean": [100.0, 200.0, 300.0, 50.0, 0.0, 200.0],
            "final_accuracy_mean": [0.90, 0.95, 0.93, 0.80, 0.99, 0.95],
        }
    )
    # 300 B at 93 % is beaten by 200 B at 95 %; two points equal on both axes are both on
    # it; K=1 (0 bytes) has no place on the log axis and is on no front.
    assert fronts(summary, {"w": ACC}, "bytes_mean", x_higher=False) == [True, True, False, True, None, True]


def test_a_front_is_drawn_per_workload():
    summary = pd.DataFrame(
        {
            "workload": ["a", "a", "b"],
            "bytes_mean": [100.0, 200.0, 300.0],
            "final_accuracy_mean": [0.9, 0.8, 0.1],
        }
    )
    assert fronts(summary, {"a": ACC, "b": ACC}, "bytes_mean", x_higher=False) == [True, False, True]


def test_only_streaming_and_compression_keys_that_vary_count():
    runs = pd.DataFrame(
        {
            "config.algorithm.period": [4, 8],
            "config.algorithm.fragments": [2, 2],
            "config.algorithm.overlap": [math.nan, 1],
            "config.algorithm.compression.codec": ["int8", "int8"],
        }
    )
    assert varied_keys(runs) == ["config.algorithm.overlap"]
    assert varied_keys(runs.drop(columns=["config.algorithm.overlap"])) == []


def _store(root: Path) -> None:
    store = Store(root)
    for algorithm, workers, seeds, wall, acc in VARIANTS:
        for seed in seeds:
            config = config_of(algorithm, workers, seed)
            rows = est_rows(algorithm, workers, seed, wall, acc, True)
            assert write_run(store, run_id_of(config), config, rows, "completed") == "completed"


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """The section's table, by variant label with its K."""
    section = markdown.split(f"## {HEADING}")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        out[f"{cells['variant']} K={cells['K']}"] = [cells["front: bytes"], cells["front: time"]]
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tradeoffs")
    _store(root)
    return root


def test_a_streaming_study_gets_the_section_its_fronts_and_figures(store: Path):
    written = make_report(store, formats="png", dpi=60)
    markdown = written["markdown"].read_text()
    assert HEADING in markdown
    assert f"cluster `{SLOW_CLUSTER}`" in markdown
    for stem in ("tradeoff_bytes", "tradeoff_est_time"):
        png = written[f"{stem}.png"]
        assert png.read_bytes().startswith(b"\x89PNG")
    rows = _table_rows(markdown)
    # One worker is the reference, on no front; the mixed variant costs what the plain one
    # does and is less accurate; the streamed one is cheaper on both axes.
    assert rows == {
        "minibatch_sgd K=1": ["—", "—"],
        "local_sgd H=4 K=4": ["yes", "yes"],
        "local_sgd H=4 mixing=0.5 K=4": ["no", "no"],
        "local_sgd H=8 fragments=2 overlap=1 K=4": ["yes", "yes"],
    }
    sheet = pd.read_excel(written["xlsx"], sheet_name="tradeoffs")
    assert sheet["front_bytes"].fillna("").tolist() == ["", "yes", "no", "yes"]


def test_the_report_cluster_replaces_the_slow_default(store: Path):
    made = tradeoffs.parts(context(store, cluster="10gbe", formats="png"))
    text = " ".join(b.text for b in made.blocks if isinstance(b, Paragraph))
    assert "cluster `10gbe`" in text
    table = next(b for b in made.blocks if isinstance(b, Table))
    assert "est. time on 10gbe (s)" in table.headers
    assert [d.stem for d in made.figures] == ["tradeoff_bytes", "tradeoff_est_time"]


def test_a_study_without_streaming_or_compression_has_no_section(tmp_path: Path):
    build_estimate_store(tmp_path)
    made = tradeoffs.parts(context(tmp_path, formats="png"))
    assert not made.blocks and not made.sheets


def test_the_time_axis_is_logarithmic_only_over_a_wide_span():
    assert tradeoffs._log(pd.Series([0.81, 0.87, 1.07])) is None
    assert tradeoffs._log(pd.Series([0.8, 20.0, math.nan])) == 10
