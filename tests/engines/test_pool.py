"""Worker pools: a run served by a pool that already trained another run gives exactly the
result of the same run launched on its own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from harness import LAUNCHER_VARS, untimed_rows
from localsgd.engines.processes.engine import PROCESSES
from localsgd.records import Store
from localsgd.run.config import run_config
from localsgd.run.execute import execute_run

pytestmark = pytest.mark.timeout(600)


def config(seed: int, algorithm: dict) -> dict:
    return {
        "workers": 2,
        "device": "cpu",
        "seed": seed,
        "workload": {"name": "mnist1d_cnn", "num_samples": 1000},
        "algorithm": algorithm,
        "data": {"batch_size": 16},
        "train": {"epochs": 1, "max_steps": 12, "eval_every": 6},
    }


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_cache: str) -> None:
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def rows(run_dir: Path) -> list[dict]:
    return untimed_rows(run_dir)


def test_a_run_in_a_used_pool_equals_the_run_launched_alone(tmp_path, clean_env):
    first = run_config(config(0, {"name": "minibatch_sgd"}))
    second = run_config(config(1, {"name": "local_sgd", "period": 4}))
    pooled, alone = Store(tmp_path / "pooled"), Store(tmp_path / "alone")
    with PROCESSES.session() as session:
        assert execute_run(first, pooled, session=session) == "completed"
        (pool,) = session.pools
        workers = pool.pids
        assert execute_run(second, pooled, session=session) == "completed"
        # The same two processes and process group served both runs.
        assert session.pools == (pool,) and pool.runs == 2 and pool.pids == workers and len(workers) == 2
    assert not pool.alive
    assert execute_run(second, alone) == "completed"  # its own launcher, as before pools

    a, b = pooled.run_dir(second.run_id()), alone.run_dir(second.run_id())
    served = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    launched = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert served.keys() == launched.keys()
    for name in served:
        assert torch.equal(served[name], launched[name]), name
    assert rows(a) == rows(b) and [r["step"] for r in rows(a)] == [6, 12]
    assert rows(a)[-1]["syncs"] == 3
    env = json.loads((a / "env.json").read_text())
    assert env["world_size"] == 2 and env["backend"] == "gloo" and "--serve" in env["command"]
    assert (a / "workers.log").read_text().count("rank 0 step") == 2  # this run's lines only
    assert os.path.exists(b / "launch.json") and not os.path.exists(a / "launch.json")


def test_runs_in_parallel_slots_equal_the_same_runs_one_at_a_time(tmp_path, clean_env):
    """Under --parallel, a one-worker run trains in a pooled process of its own (a world of
    one, as in this process) instead of this process, which the slots share."""
    from localsgd.studies.grid import Study, StudySection
    from localsgd.studies.runner import run_study

    runs = [run_config({**config(seed, {"name": "minibatch_sgd"}), "workers": 1}) for seed in (0, 1)]
    counts = run_study(
        Study(StudySection("two"), runs),
        tmp_path / "parallel",
        parallel=2,
        oversubscribe=True,
        progress=False,
    )
    assert counts == {"completed": 2}
    here = Store(tmp_path / "here")
    for run in runs:
        assert execute_run(run, here) == "completed"  # in this process
        served = torch.load(
            tmp_path / "parallel" / "runs" / run.run_id() / "checkpoint.pt", weights_only=True
        )
        alone = torch.load(here.run_dir(run.run_id()) / "checkpoint.pt", weights_only=True)
        assert all(torch.equal(served["model"][k], alone["model"][k]) for k in alone["model"])
        pooled_env = json.loads((tmp_path / "parallel" / "runs" / run.run_id() / "env.json").read_text())
        assert pooled_env["world_size"] == 1 and pooled_env["backend"] is None
        assert "--serve" in pooled_env["command"]
