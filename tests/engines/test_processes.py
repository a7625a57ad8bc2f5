"""The process engine: a worker's own exception is the run's error, on the command line and
in its status; an import-path workload runs under the launcher and under a hand-run torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import LAUNCHER_VARS, worker_command

pytestmark = pytest.mark.timeout(600)

FLAKY = """
from localsgd import workloads


def make(*, fail_rank: int = 1):
    base = workloads.build("mnist1d_mlp", num_samples=1000)
    original = base.train_batches

    def train_batches(rank, world_size, batch_size, epoch, seed, device):
        if rank == fail_rank:
            raise KeyError(f"shard {rank} is missing from the bucket")
        return original(rank, world_size, batch_size, epoch, seed, device)

    base.train_batches = train_batches
    return base
"""

RUN = """
workers = 2
device = "cpu"
[workload]
name = "flaky:make"
[data]
batch_size = 16
[train]
epochs = 1
max_steps = 6
eval_every = 3
"""


@pytest.fixture
def project(tmp_path: Path, data_cache: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "flaky.py").write_text(FLAKY)
    (tmp_path / "run.toml").write_text(RUN)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", XDG_CACHE_HOME=data_cache)
    return tmp_path, env


def test_a_workers_own_exception_is_the_runs_error(project):
    cwd, env = project
    done = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "train", "run.toml", "--out", "store"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert done.returncode == 1
    assert "\nfailed: " in done.stdout
    (record,) = (cwd / "store" / "runs").iterdir()
    assert f"run folder: {Path('store') / 'runs' / record.name}" in done.stdout
    # Not the launcher's ChildFailedError summary: the worker's exception, type and rank.
    assert "error: KeyError: 'shard 1 is missing from the bucket' (rank 1)" in done.stderr
    assert "ChildFailedError" not in done.stderr
    status = json.loads((record / "status.json").read_text())
    assert status["status"] == "failed"
    error = status["error"]
    assert (error["type"], error["rank"]) == ("KeyError", 1)
    assert "in train_batches" in error["traceback"] and "flaky.py" in error["traceback"]


def test_an_import_path_workload_under_a_hand_run_torchrun(project):
    cwd, env = project
    (cwd / "run.toml").write_text(RUN.replace('name = "flaky:make"', 'name = "flaky:make"\nfail_rank = 7'))
    command = worker_command(2, "run.toml", "--out", "store")
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = (cwd / "store" / "runs").iterdir()
    status = json.loads((record / "status.json").read_text())
    assert status["status"] == "completed" and status["steps"] == 6
    assert status["primary"] == "accuracy" and status["engine"]["name"] == "processes"
    config = json.loads((record / "config.json").read_text())["config"]
    assert config["workload"] == {"name": "flaky:make", "fail_rank": 7}
