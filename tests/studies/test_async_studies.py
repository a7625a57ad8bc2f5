"""The asynchronous study files expand to the designs they describe: async.toml (MNIST-1D,
processes and Hogwild), async_scale.toml (simulated, K up to 64, two kinds of speeds) and
async_mlm_tiny.toml (the masked-LM fixtures)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from localsgd.studies.loading import load_study

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def shape(study) -> Counter:
    return Counter(
        (r.engine, r.workers, r.algorithm["name"], r.algorithm.get("period"), r.processes())
        for r in study.runs
    )


def test_async_compares_every_way_at_small_scale():
    study = load_study(STUDIES / "async.toml")
    counts = shape(study)
    assert len(study.runs) == 39 and {r.seed for r in study.runs} == {0, 1, 2}
    assert counts[("processes", 1, "minibatch_sgd", None, 1)] == 3
    for k in (2, 4):
        assert counts[("processes", k, "minibatch_sgd", None, k)] == 3
        assert counts[("processes", k, "local_sgd", 4, k)] == 3
        # Hogwild: P processes on one device, started by one leader.
        assert counts[("hogwild", k, "minibatch_sgd", None, 1)] == 3
    for k in (2, 3, 4):
        for period in (1, 4):
            assert counts[("processes", k, "async_local_sgd", period, k)] == 3


def test_async_scale_is_simulated_at_three_sizes_and_two_kinds_of_speeds():
    study = load_study(STUDIES / "async_scale.toml")
    assert len(study.runs) == 43 and {r.engine for r in study.runs} == {"simulated"}
    many = [r for r in study.runs if r.workers > 1]
    assert {r.workers for r in many} == {4, 16, 64}
    kinds = Counter(
        (r.engine_options.get("speed_spread", 0.0), r.engine_options.get("steps", "equal")) for r in many
    )
    assert kinds == {(0.0, "equal"): 15, (0.5, "equal"): 15, (0.5, "by_speed"): 12}
    assert all(r.algorithm["name"] == "async_local_sgd" for r in many if r.engine_options.get("steps"))
    fixes = {
        (getattr(r.algorithm_config(1), "staleness_lr", "none"), r.algorithm.get("outer_optimizer", "sgd"))
        for r in many
    }
    assert fixes == {("none", "sgd"), ("inverse_plus_one", "sgd"), ("none", "nesterov")}
    # SGD with Nesterov momentum inside every worker (the optimizer's default).
    assert {(r.optimizer.name, r.optimizer.momentum, r.optimizer.nesterov) for r in study.runs} == {
        ("sgd", 0.9, True)
    }


def test_async_mlm_tiny_runs_on_the_fixtures(tmp_path, monkeypatch, text_fixtures):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(
        text_fixtures["tokenizer"].parent, "studies_out/fixtures", ignore=shutil.ignore_patterns("cache")
    )
    study = load_study(STUDIES / "async_mlm_tiny.toml")
    assert {r.workload_name for r in study.runs} == {"mlm"}
    assert shape(study) == {
        ("processes", 1, "minibatch_sgd", None, 1): 1,
        ("processes", 2, "minibatch_sgd", None, 2): 1,
        ("processes", 2, "local_sgd", 8, 2): 1,
        ("processes", 2, "async_local_sgd", 1, 2): 1,
        ("processes", 2, "async_local_sgd", 8, 2): 1,
        ("hogwild", 2, "minibatch_sgd", None, 1): 1,
    }
