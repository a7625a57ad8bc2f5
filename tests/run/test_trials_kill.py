"""A batched search killed (SIGKILL) in the middle of a batch loses no finished trial.

A study of 4 trials batched in one process (``localsgd study``, a real subprocess): 2 of
them diverge at the first evaluation (step 4) and finish there, while the other 2 train
on. Every trial's data stream waits at a gate (batch 6 of epoch 0, after step 6) until the
file ``gate.open`` exists, so the kill falls at a known point: after the diverged trials
finished, before the batch ends. Their records must then be complete, valid and indexed;
the 2 others unfinished (``.partial`` folders, ``running`` in the index), and a rerun
trains only those and leaves the finished records as they were."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import localsgd
from harness import LAUNCHER_VARS, wait_until
from localsgd.records.record import ConfigSnapshot, Environment, Status, from_json, read_json, read_metrics
from localsgd.records.store import Store

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals"),
]

GATED = '''
import os, time
from pathlib import Path

from localsgd import workloads


def make(*, gate: str = "", at_batch: int = 6):
    """mnist1d_mlp whose training streams wait at batch `at_batch` of epoch 0 (writing the
    process id to GATE.reached) until the file GATE.open exists."""
    base = workloads.build("mnist1d_mlp", num_samples=1000)
    original = base.train_batches

    def train_batches(rank, world_size, batch_size, epoch, seed, device):
        for i, data in enumerate(original(rank, world_size, batch_size, epoch, seed, device)):
            if gate and (epoch, i) == (0, at_batch):
                Path(gate + ".reached").write_text(str(os.getpid()))
                while not Path(gate + ".open").exists():
                    time.sleep(0.02)
            yield data

    base.train_batches = train_batches
    return base
'''

STUDY = """[study]
name = "killed"
[base]
workers = 1
engine = "simulated"
device = "cpu"
[base.workload]
name = "gated:make"
gate = "{gate}"
[base.algorithm]
name = "minibatch_sgd"
[base.optimizer]
momentum = 0.0
nesterov = false
[base.data]
batch_size = 16
[base.train]
epochs = 1
max_steps = 12
eval_every = 4
[[grid]]
optimizer = [
    {{lr = 0.05, momentum = 0.0, nesterov = false}},
    {{lr = 1e10, momentum = 0.0, nesterov = false, weight_decay = 1.0}},
    {{lr = 0.1, momentum = 0.0, nesterov = false}},
    {{lr = 1e12, momentum = 0.0, nesterov = false, weight_decay = 1.0}},
]
"""
DIVERGING = (1, 3)
"""The trials (in grid order) whose weights blow up at once: diverged at step 4."""


@pytest.fixture
def project(tmp_path: Path, data_cache: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "gated.py").write_text(GATED)
    (tmp_path / "study.toml").write_text(STUDY.format(gate=tmp_path / "gate"))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", XDG_CACHE_HOME=data_cache)
    # The study runs the localsgd under test, wherever the test's working directory is.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(localsgd.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return tmp_path, env


def study(cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localsgd.cli",
            "study",
            "study.toml",
            "--out",
            "store",
            "--batch-trials",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def runs_by_lr(store: Store) -> list[tuple[str, dict[str, Any]]]:
    """(run id, config) of the 4 trials in grid order (by their learning rates)."""
    with store._db() as db:
        rows = db.execute("SELECT run_id, config FROM runs").fetchall()
    order = [0.05, 1e10, 0.1, 1e12]
    found = {json.loads(config)["optimizer"]["lr"]: (run_id, json.loads(config)) for run_id, config in rows}
    assert sorted(found) == sorted(order)
    return [found[lr] for lr in order]


def test_a_kill_mid_batch_keeps_the_trials_that_had_finished(project):
    cwd, env = project
    proc = study(cwd, env)
    try:
        wait_until((cwd / "gate.reached").exists, proc, "gate.reached")
        assert int((cwd / "gate.reached").read_text()) == proc.pid  # the batch trains in the study's process
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    store = Store(cwd / "store", create=False)
    runs = runs_by_lr(store)
    finished: dict[str, str] = {}
    for i, (run_id, config) in enumerate(runs):
        final, partial = store.run_dir(run_id), store.partial_dir(run_id)
        if i in DIVERGING:
            # Finished before the kill: moved into place, indexed, every file whole.
            assert store.status(run_id) == "diverged" and final.is_dir() and not partial.exists()
            status = from_json(Status, read_json(final / "status.json"), "status.json")
            assert status.status == "diverged" and status.error is not None
            assert "train loss is" in status.error.message and "at step 4" in status.error.message
            assert status.details == {} and status.steps == 4
            assert [row.step for row in read_metrics(final / "metrics.jsonl")] == [4]
            snapshot = from_json(ConfigSnapshot, read_json(final / "config.json"), "config.json")
            assert snapshot.run_id == run_id and snapshot.config == config
            assert from_json(Environment, read_json(final / "env.json"), "env.json").world_size == 1
            assert not list(final.glob(".*.tmp*"))  # no temporary file of a group commit left
            finished[run_id] = (final / "status.json").read_text()
        else:
            # Still training at the kill: unfinished, as the store leaves a killed run.
            assert store.status(run_id) == "running" and partial.is_dir() and not final.exists()
            assert not (partial / "status.json").exists()
            assert [row.step for row in read_metrics(partial / "metrics.jsonl")] == [4]
    assert sorted(r.run_id for r in store.records()) == sorted(finished)

    # Again, with the gate open: only the 2 unfinished trials train; the others are kept.
    (cwd / "gate.open").touch()
    proc = study(cwd, env)
    out, err = proc.communicate(timeout=200)
    # The study's exit code says that runs diverged (the 2 kept from before).
    assert proc.returncode == 1 and "2 of 4 runs failed or diverged" in err, err[-3000:]
    assert "2 run(s) to do (2 finished before)" in out + err
    store = Store(cwd / "store", create=False)
    records = {r.run_id: r for r in store.records()}
    assert len(records) == 4
    for i, (run_id, _) in enumerate(runs):
        record = records[run_id]
        if i in DIVERGING:
            assert record.status == "diverged"
            assert (record.path / "status.json").read_text() == finished[run_id]  # not trained again
        else:
            assert record.status == "completed" and record.problem is None
            assert record.status_info.details["trials_batched"] == 2
            assert [row.step for row in record.metrics()] == [4, 8, 12]
            assert (record.path / "checkpoint.pt").is_file()
