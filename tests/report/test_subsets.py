"""Per workload and training subset: the primary metric against speedup, one panel each,
and the workbook sheet, with each subset's speedup against its own single worker. (A study
without subsets gets neither: tests/report/test_report.py checks its exact files and sheets.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from localsgd.records import Store
from localsgd.report import make_report
from report.stores import config_of
from report.test_report import _add_run, _sheet


def test_each_subset_gets_a_panel_and_its_own_baseline(tmp_path: Path) -> None:
    store = Store(tmp_path)
    walls = {(512, 1): 40.0, (512, 2): 25.0, (2048, 1): 160.0, (2048, 2): 80.0}
    for (subset, workers), wall in walls.items():
        for seed in (0, 1):
            algorithm = {"name": "local_sgd", "period": 4} if workers > 1 else {"name": "minibatch_sgd"}
            config = config_of(algorithm, workers, seed)
            config["workload"] = {"name": "mnist1d_cnn", "data": {"train_subset": subset}}
            config["name"] = f"{subset}-{workers}-{seed}"
            _add_run(store, config, "completed", wall + seed, 0.7 + subset / 10_000)
    paths = make_report(tmp_path, formats="png")
    assert paths["metric_vs_speedup_by_subset.png"].stat().st_size > 0
    assert "](metric_vs_speedup_by_subset.png)" in paths["markdown"].read_text()
    sheet = _sheet(paths, "by_subset")
    sheet["subset"] = sheet["subset"].astype(str)  # Excel reads digit strings back as numbers
    assert list(sheet["subset"]) == ["512", "512", "2048", "2048"]
    assert set(sheet["metric"]) == {"accuracy"}
    k2 = sheet[sheet["workers"] == 2].set_index("subset")
    assert k2.loc["512", "speedup"] == pytest.approx(40.5 / 25.5)
    assert k2.loc["2048", "speedup"] == pytest.approx(160.5 / 80.5)
    assert k2.loc["2048", "final_mean"] == pytest.approx(0.7 + 0.2048, abs=0.02)


def test_settings_are_what_varies_within_a_workload_and_the_subset_figure_says_it_once(
    tmp_path: Path,
) -> None:
    from localsgd.report import graphics, subsets
    from localsgd.report.tables import load, summary_table

    store = Store(tmp_path)
    for workload, samples in (("mnist1d_cnn", 4000), ("mnist1d_mlp", 8000)):
        for subset in (512, 2048):
            for workers in (1, 2):
                algorithm = {"name": "local_sgd", "period": 4} if workers > 1 else {"name": "minibatch_sgd"}
                config = config_of(algorithm, workers, 0)
                # num_samples differs between the workloads only: not a setting.
                config["workload"] = {
                    "name": workload,
                    "num_samples": samples,
                    "data": {"train_subset": subset},
                }
                config["name"] = f"{workload}-{subset}-{workers}"
                _add_run(store, config, "completed", 10.0 * workers, 0.9)
    study = load(tmp_path)
    assert set(study.runs["setting"]) == {"data.train_subset=512", "data.train_subset=2048"}
    summary = summary_table(study)
    look = graphics.styles(summary)
    split = subsets.by_subset(study, summary)
    metrics = {w: m for w in study.declared if (m := study.primary(w)) is not None}
    fig = subsets.metric_vs_speedup_by_subset(split, look, metrics).figure
    assert fig is not None
    legends = [t.get_text() for sub in fig.subfigs for leg in sub.legends for t in leg.get_texts()]
    assert "local_sgd H=4, K=2 (n=1)" in legends and "minibatch_sgd, K=1 (n=1)" in legends
    assert not any("subset" in text or "num_samples" in text for text in legends)
    # Stacked panels: the figure's title has a row of its own, above the first panel's.
    head, first = fig.subfigs[:2]
    assert [t.get_text() for t in head.texts] == [
        "Final test accuracy against speedup over one worker (mean ± std over seeds)"
    ]
    assert first.get_suptitle() == "Workload mnist1d_cnn, subset 512"
