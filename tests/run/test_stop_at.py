"""train.stop_at: a run ends at the first evaluation that strictly crosses a target."""

from __future__ import annotations

import pytest

from localsgd import engines
from localsgd.records import Store
from localsgd.run.config import run_config
from localsgd.run.execute import execute_run, preflight
from localsgd.util.checks import ConfigError


def record(store: Store, run_id: str):
    return next(r for r in store.records() if r.run_id == run_id)


def tiny(**train) -> dict:
    return {
        "workload": {"name": "mnist1d_mlp", "num_samples": 1000},
        "engine": "simulated",
        "data": {"batch_size": 50},
        "optimizer": {"lr": 0.5},
        "train": {"epochs": 3, "eval_every": 4, **train},
    }


def test_a_run_stops_at_its_first_strict_crossing(tmp_path, monkeypatch, data_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    store = Store(tmp_path / "store")
    session = engines.get("simulated").session(in_process=True)  # no worker process to start
    full = run_config(tiny())
    assert execute_run(full, store, session=session) == "completed"
    rows = record(store, full.run_id()).metrics()
    # 1000 samples: 800 for training, 80 of them held out for validation; 14 steps of 50 an epoch.
    assert [r.step for r in rows] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 42]
    # stop_at reads the validation split by default (held out of the training data).
    accuracies = [r.validation["accuracy"] for r in rows]
    assert accuracies != [r.metrics["accuracy"] for r in rows]
    # A target between two evaluations: the run stops at the first one strictly above it.
    first = next(i for i, a in enumerate(accuracies) if a > min(accuracies))
    target = min(accuracies)
    stopped = run_config(tiny(stop_at=f"accuracy={target}"))
    assert execute_run(stopped, store, session=session) == "completed"
    done = record(store, stopped.run_id())
    kept = done.metrics()
    assert [r.step for r in kept] == [r.step for r in rows[: first + 1]]
    assert [r.validation["accuracy"] for r in kept] == pytest.approx(accuracies[: first + 1])
    assert done.status_info.steps == rows[first].step and done.status_info.total_steps == 42
    # Equal is not crossed: at the best value reached, the run goes to its end.
    at_best = run_config(tiny(stop_at=f"accuracy={max(accuracies)}"))
    assert execute_run(at_best, store, session=session) == "completed"
    assert record(store, at_best.run_id()).status_info.steps == 42
    # train.stop_split = "test" reads the test split instead.
    tests = [r.metrics["accuracy"] for r in rows]
    on_test = run_config(tiny(stop_at=f"accuracy={min(tests)}", stop_split="test"))
    assert execute_run(on_test, store, session=session) == "completed"
    first_test = next(i for i, a in enumerate(tests) if a > min(tests))
    assert record(store, on_test.run_id()).status_info.steps == rows[first_test].step


def test_stop_at_errors_name_the_key(tmp_path, monkeypatch, data_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    for bad in ("accuracy", "accuracy=high", "=0.5", "accuracy=nan"):
        with pytest.raises(ConfigError, match=r"train\.stop_at must be METRIC=VALUE"):
            run_config(tiny(stop_at=bad))
    with pytest.raises(
        ConfigError,
        match=r"train\.stop_at = 'bleu=3': mnist1d_mlp has the metrics \['accuracy', 'eval_loss'\]",
    ):
        preflight([run_config(tiny(stop_at="bleu=3"))])
    with pytest.raises(ConfigError, match=r"train\.stop_split must be one of \['validation', 'test'\]"):
        run_config(tiny(stop_split="train"))
    unheld = run_config({**tiny(stop_at="accuracy=0.5"), "workload": {"name": "mnist1d_mlp", "num_samples": 1000, "validation_fraction": 0.0}})
    with pytest.raises(
        ConfigError,
        match=r"reads the validation split, which mnist1d_mlp does not hold out: set "
        r"workload\.validation_fraction > 0, or train\.stop_split = 'test'",
    ):
        preflight([unheld])


def test_batched_trials_stop_each_at_its_own_crossing(tmp_path, monkeypatch, data_cache):
    import json

    from localsgd.run.trials import train_trials
    from run.test_trials import TRIALS

    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)

    def rows(configs, name):
        folders = [tmp_path / f"{name}-{c.name}" for c in configs]
        for folder in folders:
            folder.mkdir()
        statuses = train_trials(configs, folders)
        return statuses, [
            [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in folders
        ]

    _, full = rows(TRIALS, "full")
    first = [r[0]["validation"]["accuracy"] for r in full]
    assert max(first) > min(first)
    target = (max(first) + min(first)) / 2  # some trials cross at their first evaluation, some do not
    stopping = [
        c.replace(train=c.train.__class__(**{**c.train.__dict__, "stop_at": f"accuracy={target}"}))
        for c in TRIALS
    ]
    statuses, stopped = rows(stopping, "stopped")
    for status, ours, theirs in zip(statuses, stopped, full):
        crossing = next(
            (i for i, r in enumerate(theirs) if r["validation"]["accuracy"] > target), len(theirs) - 1
        )
        assert [r["step"] for r in ours] == [r["step"] for r in theirs[: crossing + 1]]
        assert [r["metrics"]["accuracy"] for r in ours] == [
            r["metrics"]["accuracy"] for r in theirs[: crossing + 1]
        ]
        assert status.status == "completed" and status.steps == ours[-1]["step"]
    lengths = {len(r) for r in stopped}
    assert 1 in lengths and max(lengths) > 1  # some stopped at their first evaluation, some later
