"""A finished run is reported as it ended, whatever its workers' exit: the workers leave
without the interpreter's teardown (which aborted a finished worker now and then), many
launches in a row end completed with no abort in their logs, and a launch whose record is
complete but whose worker died of a signal afterwards is completed, while a run that did
not complete stays failed."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from harness import LAUNCHER_VARS
from localsgd.engines import Job, WorkerFailure
from localsgd.engines.launching import launch
from localsgd.records import Store
from localsgd.run.config import run_config
from localsgd.run.execute import execute_run

pytestmark = pytest.mark.timeout(600)

LAUNCHES = 6
ABORTED = "failed (exitcode: -6) local_rank: 1 (pid: 4242) of binary: python"


def test_many_launches_end_completed_with_no_abort(tmp_path, monkeypatch, data_cache):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = Store(tmp_path / "store")
    for seed in range(LAUNCHES):
        run = run_config(
            {
                "workers": 2,
                "device": "cpu",
                "seed": seed,
                "workload": {"name": "mnist1d_mlp", "num_samples": 1000},
                "data": {"batch_size": 16},
                "train": {"epochs": 1, "max_steps": 3, "eval_every": 3},
            }
        )
        assert execute_run(run, store) == "completed"
        workers_log = (store.run_dir(run.run_id()) / "workers.log").read_text()
        # Not merely reported completed: no worker aborted and the launcher saw no failure.
        assert "terminate called" not in workers_log
        assert "exitcode" not in workers_log and "FAILED" not in workers_log


def _job(folder: Path) -> Job:
    return Job(2, 1, folder, lambda rank, world_size: None, timeout=60.0)


def _fake_launcher(monkeypatch: pytest.MonkeyPatch, said: str, code: int) -> None:
    """The launcher replaced by a process that logs ``said`` as torch's elastic launcher
    logs a failed worker, and exits with ``code``."""
    script = f"import sys; print({said!r}); sys.exit({code})"
    monkeypatch.setattr(launch, "torchrun_command", lambda *args, **kwargs: [sys.executable, "-c", script])


def _status(folder: Path, status: str) -> None:
    (folder / "status.json").write_text(json.dumps({"version": 1, "status": status}))


def test_a_complete_record_spoiled_by_an_exit_signal_is_completed(tmp_path, monkeypatch, caplog):
    _status(tmp_path, "completed")
    _fake_launcher(monkeypatch, ABORTED, 1)
    with caplog.at_level(logging.WARNING, logger="localsgd.engines.launching.launch"):
        launch.launch_run(_job(tmp_path), 2)  # no WorkerFailure
    assert "rank 1 then exited with SIGABRT; the run is reported completed" in caplog.text


def test_a_run_without_a_completed_record_still_fails(tmp_path, monkeypatch):
    _fake_launcher(monkeypatch, ABORTED, 1)
    with pytest.raises(WorkerFailure, match="workers exited with code 1"):
        launch.launch_run(_job(tmp_path), 2)
    _status(tmp_path, "failed")
    with pytest.raises(WorkerFailure, match="workers exited with code 1"):
        launch.launch_run(_job(tmp_path), 2)


def test_a_recorded_worker_error_or_an_exit_code_still_fails(tmp_path, monkeypatch):
    _status(tmp_path, "completed")
    _fake_launcher(monkeypatch, "failed (exitcode: 1) local_rank: 0 (pid: 7) of binary: python", 1)
    with pytest.raises(WorkerFailure, match="workers exited with code 1"):
        launch.launch_run(_job(tmp_path), 2)
    _fake_launcher(monkeypatch, ABORTED, 1)
    launch.write_worker_error(tmp_path, 0, OSError("disk full"))
    with pytest.raises(WorkerFailure, match="disk full"):
        launch.launch_run(_job(tmp_path), 2)


def test_the_worker_entry_keeps_its_exit_codes(tmp_path):
    """Leaving by ``os._exit`` keeps what ``sys.exit`` meant: a usage error 2, a bad config
    2 with its one-line message, both written out before the process ends."""
    import subprocess

    usage = subprocess.run(
        [sys.executable, "-m", "localsgd.worker"], capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == 2 and "a run config is required" in usage.stderr
    (tmp_path / "bad.toml").write_text("workers = 0\n")
    bad = subprocess.run(
        [sys.executable, "-m", "localsgd.worker", "bad.toml", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "workers" in bad.stderr
