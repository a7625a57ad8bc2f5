"""``localsgd train`` without ``--resume`` starts its run afresh: what of the run the store
already holds, and the fresh start drops, is said in one warning line on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import localsgd
from harness import LAUNCHER_VARS
from localsgd.cli import _say_what_is_redone
from localsgd.records import Store
from localsgd.run.checkpoints import CHECKPOINTS, Checkpoints

RUN = """
[workload]
name = "mnist1d_cnn"
num_samples = 1000
[data]
batch_size = 16
[train]
epochs = 1
max_steps = 5
eval_every = 5
"""
RUN_ID = "abcdef012345"


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    store.begin(RUN_ID, "a run", {"name": "a run"})
    return store


def _said(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def test_a_store_without_the_run_gives_no_warning(tmp_path, capsys):
    _say_what_is_redone(Store(tmp_path / "store"), RUN_ID)
    assert _said(capsys) == []


def test_a_run_left_unfinished_without_a_checkpoint_is_said_to_start_again(tmp_path, capsys):
    store = _store(tmp_path)
    _say_what_is_redone(store, RUN_ID)
    assert _said(capsys) == [
        f"warning: run {RUN_ID}: {store.partial_dir(RUN_ID)}: left unfinished without a checkpoint; "
        "the run starts again from step 0"
    ]


def test_a_dropped_checkpoint_is_said_with_the_flag_that_would_keep_it(tmp_path, capsys):
    store = _store(tmp_path)
    partial = store.partial_dir(RUN_ID)
    Checkpoints(partial / CHECKPOINTS, 0, 1, 1, RUN_ID).save({"step": 3}, barrier=lambda: None)
    _say_what_is_redone(store, RUN_ID)
    assert _said(capsys) == [
        f"warning: run {RUN_ID}: {partial}: its checkpoint is dropped and the run starts again from "
        f"step 0 (--resume {partial} continues it)"
    ]


def test_training_the_same_run_twice_says_that_the_finished_record_is_replaced(tmp_path, data_cache):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["XDG_CACHE_HOME"] = data_cache
    # The package under test, wherever the command runs (a relative PYTHONPATH would not follow).
    source = str(Path(localsgd.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [env.get("PYTHONPATH")])])
    (tmp_path / "run.toml").write_text(RUN)
    command = [sys.executable, "-m", "localsgd.cli", "train", "run.toml", "--out", "store"]

    first = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "warning" not in first.stderr
    (folder,) = (tmp_path / "store" / "runs").iterdir()

    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr
    warned = [line for line in second.stderr.splitlines() if line.startswith("warning: ")]
    assert warned == [
        f"warning: run {folder.name}: {Path('store') / 'runs' / folder.name}: "
        "the run's finished record is replaced by this run"
    ]
