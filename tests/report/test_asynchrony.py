"""The report's asynchronous-training section, from real simulated runs: the staleness table
is the servers' recorded histograms pooled over seeds, the bound shows in it, the figures are
written in every format, the cluster estimate covers the server's pushes and pulls, and a
study without asynchronous runs has no such section."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from localsgd.costmodel import comm_seconds, preset
from localsgd.records import Store
from localsgd.report import make_report
from localsgd.report.asynchrony import quantile
from localsgd.report.estimates import estimate
from localsgd.report.tables import load, summary_table
from localsgd.run.config import run_config
from localsgd.studies.grid import Study, StudySection
from localsgd.studies.runner import run_study

pytestmark = pytest.mark.timeout(600)


def config(seed: int, algorithm: dict[str, Any], speeds: list[float] | None = None) -> Any:
    return run_config(
        {
            "workload": {"name": "mnist1d_mlp", "num_samples": 1000},
            "workers": 4,
            "engine": "simulated",
            "engine_options": {"worker_speeds": speeds} if speeds else {},
            "seed": seed,
            "algorithm": algorithm,
            "data": {"batch_size": 8},
            "optimizer": {"lr": 0.05},
            "train": {"epochs": 1, "max_steps": 12, "eval_every": 6},
        }
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bounded = {"name": "async_local_sgd", "period": 2, "max_staleness": 1}
    runs = [config(0, {"name": "minibatch_sgd"})]
    runs += [config(seed, bounded, [2.0, 1.0, 1.0, 0.5]) for seed in (0, 1)]
    root = tmp_path_factory.mktemp("async_study")
    assert run_study(Study(StudySection("async"), runs), root, progress=False) == {"completed": 3}
    return root


def histograms(root: Path) -> list[dict[str, Any]]:
    out = []
    for record in Store(root, create=False).records():
        server = (record.status_info.details or {}).get("server")
        if server:
            out.append(server)
    return out


def test_the_section_shows_the_recorded_staleness_pooled_over_seeds(study: Path, tmp_path: Path) -> None:
    servers = histograms(study)
    assert len(servers) == 2
    pooled: Counter[int] = Counter()
    for s in servers:
        pooled.update({int(k): v for k, v in s["staleness"].items()})
    assert max(pooled) <= 1 and sum(pooled.values()) == sum(s["pushes"] for s in servers)

    paths = make_report(study, tmp_path / "report", cluster="10gbe", formats="png,svg")
    text = paths["markdown"].read_text()
    assert "## Asynchronous training" in text
    assert {"metric_vs_updates.png", "metric_vs_updates.svg", "staleness_distribution.svg"} <= {
        p.name for p in paths.values()
    }
    section = text[text.index("## Asynchronous training") :]
    line = next(ln for ln in section.splitlines() if ln.startswith("| ") and "async_local_sgd" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    total = sum(pooled.values())
    mean = sum(k * v for k, v in pooled.items()) / total
    # seeds, pushes (mean over seeds), staleness mean, p50, p90, max, lost workers
    assert cells[2] == "2"
    assert float(cells[5]) == pytest.approx(total / 2)
    assert float(cells[6]) == pytest.approx(mean, rel=1e-3)
    assert [float(c) for c in cells[7:10]] == [quantile(pooled, 0.5), quantile(pooled, 0.9), max(pooled)]
    assert cells[10] == "0"
    # The synchronous baseline: one update per step, no server columns.
    base = next(ln for ln in section.splitlines() if ln.startswith("| ") and "minibatch_sgd" in ln)
    assert [c.strip() for c in base.strip("|").split("|")][3] == "12"

    # The estimate on 10 GbE charges each push and pull to the server's link.
    loaded = load(study)
    study_frame = estimate(loaded, summary_table(loaded), preset("10gbe"), None).study.runs
    for run in study_frame[study_frame["algorithm"] == "async_local_sgd"].itertuples():
        counters = loaded.final_counters[str(run.run_id)]["by_scope"]
        assert set(counters) == {"push", "pull"} and counters["push"]["collectives"] > 0
        assert run.est_comm_seconds == pytest.approx(comm_seconds(counters, 4, preset("10gbe")))


def test_quantiles_of_a_histogram() -> None:
    h = Counter({0: 5, 1: 3, 4: 2})
    assert [quantile(h, q) for q in (0.5, 0.8, 0.9, 1.0)] == [0.0, 1.0, 4.0, 4.0]
    assert quantile(Counter(), 0.5) != quantile(Counter(), 0.5)  # NaN: no pushes


def test_figures_have_a_panel_per_worker_count_and_one_legend_for_both_encodings(study: Path) -> None:
    from matplotlib.colors import to_hex

    from localsgd.report.asynchrony import groups, runs_frame, staleness_plot, updates_plot

    loaded = load(study)
    summary = groups(runs_frame(loaded))
    fig = updates_plot(loaded, list(summary["group"]))
    assert fig is not None
    shown = [ax for ax in fig.get_axes() if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["K = 4"]
    # Both runs have K = 4 (no one-worker reference here): a colour each, named by variant.
    assert len({to_hex(line.get_color()) for line in shown[0].get_lines()}) == 2
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    speeds = "simulated worker_speeds=[2.0, 1.0, 1.0, 0.5]"
    assert labels == ["async_local_sgd H=2 max_staleness=1", "minibatch_sgd", "simulated", speeds]
    assert legend.get_title().get_text() == "variant (colour), engine (line style)"

    fig = staleness_plot(summary)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["async_local_sgd H=2 max_staleness=1"]
    assert legend.get_title().get_text() == f"variant (line); engine {speeds}"  # one engine: in the title
