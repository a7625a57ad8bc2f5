"""A full disk: ``localsgd train`` and ``localsgd study`` on a store whose filesystem fills
up mid-run stop with one error line naming the file (exit code 4), leave nothing
half-written in the store (every JSON file parses, no temporary file is left, the index
calls no unfinished run finished), and, once space is freed, the same command (train:
``--resume`` the run folder the line names) completes the run with the rows of the run done
in one go.

The filesystem is a size-limited tmpfs, which only root can mount: those tests skip
without it. The others reach a full disk through ``/dev/full`` or an error a worker
recorded."""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harness import FAULT_TRAINING, FAULT_WORKLOAD, LAUNCHER_VARS, untimed_rows
from localsgd import workloads
from localsgd.engines.base import WorkerFailure
from localsgd.engines.launching.heartbeat import HEARTBEATS
from localsgd.engines.launching.launch import root_error, write_worker_error
from localsgd.records import Store
from localsgd.records.record import ErrorInfo, MetricsRow, RunWriter
from localsgd.run.checkpoints import verify
from localsgd.run.config import run_config
from localsgd.run.execute import execute_run
from localsgd.util.files import DiskFull, disk_full, no_space

pytestmark = pytest.mark.timeout(600)

# 720 training samples, K = 2, B = 16: local SGD syncs every 2nd step, checkpoints at steps
# 4, 8, ... A rank's checkpoint file is about 140 kB: 400 kB hold the store and the
# checkpoint of step 4, not the one of step 8.
TRAINING = {**FAULT_TRAINING, "workload": FAULT_WORKLOAD}
SMALL = 400 * 1024


def toml(values: dict, prefix: str = "") -> str:
    """``values`` as TOML: plain keys first, then a table per dict."""
    plain = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if not isinstance(v, dict))
    tables = "".join(
        f"[{prefix}{k}]\n" + toml(v, f"{prefix}{k}.") for k, v in values.items() if isinstance(v, dict)
    )
    return plain + tables


@pytest.fixture(scope="module")
def cache(data_cache: str) -> Path:
    return Path(data_cache)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def disk(project: Path) -> Iterator[Path]:
    """``project/disk``: a tmpfs of 4 MiB, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    folder = project / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def uninterrupted(uninterrupted_run: Path) -> Path:
    """The run trained in one go, as every run resumed after a full disk must end."""
    return uninterrupted_run


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return subprocess.run(
        [sys.executable, "-m", "localsgd.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def free(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def assert_nothing_half_written(store: Path, run_id: str) -> None:
    """Every JSON file parses, every metrics line is a whole row, no temporary file is
    left, and the index calls the run unfinished (no report counts it)."""
    for path in store.rglob("*"):
        assert ".tmp" not in path.name, f"temporary file left: {path}"
        if path.suffix == ".json":
            json.loads(path.read_text())
        if path.name == "metrics.jsonl":
            for line in path.read_text().splitlines():
                MetricsRow(**json.loads(line))
    with sqlite3.connect(f"file:{store / 'index.sqlite'}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT run_id, status FROM runs").fetchall() == [(run_id, "running")]
    assert not (store / "runs" / run_id).exists()  # only its .partial folder
    assert Store(store, create=False).records() == []


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "WorkersExited" not in err
    return lines[0]


def test_a_train_whose_disk_fills_stops_with_one_line_and_resumes_exactly(project, disk, uninterrupted):
    subprocess.run(["mount", "-o", f"remount,size={SMALL // 1024}k", str(disk)], check=True)
    (project / "run.toml").write_text(toml(TRAINING))
    run_id = run_config(TRAINING).run_id()
    partial = f"disk/store/runs/{run_id}.partial"

    first = cli(["train", "run.toml", "--out", "disk/store"], project)
    assert first.returncode == 4, first.stderr
    line = one_error_line(first.stderr)
    assert re.fullmatch(
        rf"error: no space left on device \(ENOSPC\) writing {re.escape(partial)}/\S+: free space and "
        rf"rerun with --resume {re.escape(partial)} to continue from its last checkpoint",
        line,
    ), line
    assert_nothing_half_written(disk / "store", run_id)
    assert verify(project / partial, run_id) == 4  # it filled up after the first checkpoint

    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    again = cli(["train", "--resume", partial], project)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == "resuming from the checkpoint of step 4"
    done = disk / "store" / "runs" / run_id
    assert json.loads((done / "status.json").read_text())["resumed"] == [4]
    assert untimed_rows(done) == untimed_rows(uninterrupted)
    expected = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)["model"]
    got = torch.load(done / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_study_whose_disk_fills_stops_with_one_line_and_the_same_command_finishes_it(
    project, disk, uninterrupted
):
    (project / "study.toml").write_text(
        '[study]\nname = "full"\n' + toml({"base": TRAINING}) + "[[grid]]\nseed = [0]\n"
    )
    filler = disk / "filler"
    filler.write_bytes(bytes(free(disk) - SMALL))

    first = cli(["study", "study.toml", "--out", "disk/store"], project)
    assert first.returncode == 4, first.stderr
    line = one_error_line(first.stderr)
    (partial,) = (disk / "store" / "runs").glob("*.partial")
    where = f"disk/store/runs/{partial.name}"
    assert re.fullmatch(
        rf"error: no space left on device \(ENOSPC\) writing {re.escape(where)}/\S+: "
        "free space and rerun the same command to resume",
        line,
    ), line
    run_id = partial.name.removesuffix(".partial")
    assert_nothing_half_written(disk / "store", run_id)
    json.loads((disk / "store" / "plan.json").read_text())

    filler.unlink()
    again = cli(["study", "study.toml", "--out", "disk/store"], project)
    assert again.returncode == 0, again.stderr
    assert "study full: 1 completed" in again.stdout
    assert f"{where}: resumes from its checkpoint of step 4" in again.stderr
    done = disk / "store" / "runs" / run_id
    assert json.loads((done / "status.json").read_text())["resumed"] == [4]
    assert untimed_rows(done) == untimed_rows(uninterrupted)


def test_out_of_inodes_the_workers_error_reaches_the_user_through_the_heartbeat_folder(project, disk):
    """No file can be created (the filesystem's inodes are spent, ENOSPC too): a worker
    cannot write its error into the run folder, and the line still names the file."""
    subprocess.run(["mount", "-o", "remount,nr_inodes=18", str(disk)], check=True)
    (project / "run.toml").write_text(toml(TRAINING))
    run_id = run_config(TRAINING).run_id()
    partial = f"disk/store/runs/{run_id}.partial"
    result = cli(["train", "run.toml", "--out", "disk/store"], project)
    assert result.returncode == 4, result.stderr
    line = one_error_line(result.stderr)
    assert re.fullmatch(
        rf"error: no space left on device \(ENOSPC\) writing {re.escape(partial)}/checkpoints/step\d+-rank\d\.pt: "
        rf"free space and rerun with --resume {re.escape(partial)} to continue from its last checkpoint",
        line,
    ), line
    assert not (project / partial / "errors").exists()  # it came through the heartbeat folder
    assert_nothing_half_written(disk / "store", run_id)
    assert verify(project / partial, run_id) == 4


def test_a_store_that_cannot_even_be_created_is_named(project, disk):
    subprocess.run(["mount", "-o", "remount,size=12k", str(disk)], check=True)
    (project / "run.toml").write_text(toml(TRAINING))
    result = cli(["train", "run.toml", "--out", "disk/store"], project)
    assert result.returncode == 4, result.stderr
    assert one_error_line(result.stderr) == (
        "error: no space left on device (ENOSPC) writing disk/store/index.sqlite: "
        "free space and rerun the same command"
    )
    assert [p.name for p in (disk / "store").rglob("*") if ".tmp" in p.name] == []


# -- without root --------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_metrics_row_the_disk_cannot_take_is_a_disk_full_naming_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    writer = RunWriter(tmp_path)
    row = MetricsRow(step=5, epoch=0.1, samples=80, wall_seconds=0.1, lr=0.1, train_loss=2.0, metrics={})
    with pytest.raises(
        DiskFull, match=rf"^no space left on device \(ENOSPC\) writing {tmp_path}/metrics\.jsonl$"
    ):
        writer.row(row)
    assert writer.rows == []  # the row is not counted as written
    writer.close()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_torch_save_on_a_full_disk_is_told_from_other_failures():
    with open("/dev/full", "wb", buffering=0) as f, pytest.raises((RuntimeError, OSError)) as failed:
        torch.save({"x": torch.zeros(10000)}, f)
    # torch raises the OSError, or (writing to a path) a RuntimeError while handling it.
    assert no_space(failed.value)
    try:
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from failed.value
    except RuntimeError as wrapped:
        assert no_space(wrapped)
    full = disk_full(failed.value, "/somewhere/file.pt")
    assert (
        isinstance(full, DiskFull)
        and str(full) == "no space left on device (ENOSPC) writing /somewhere/file.pt"
    )
    other = RuntimeError("unexpected pos")
    assert not no_space(other) and disk_full(other, "x") is other
    assert no_space(sqlite3.OperationalError("database or disk is full"))
    assert no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))


def test_a_worker_error_the_run_folder_cannot_take_reaches_the_controller(tmp_path, monkeypatch):
    beats = tmp_path / "beats"
    beats.mkdir()
    monkeypatch.setenv(HEARTBEATS, str(beats))
    run_dir = tmp_path / "run"
    run_dir.write_text("")  # its errors/ cannot be made: as on a full disk
    write_worker_error(run_dir, 1, DiskFull(tmp_path / "run" / "metrics.jsonl"))
    assert not (run_dir.parent / "errors").exists()
    error = root_error(run_dir, beats)
    assert error is not None and (error.type, error.rank) == ("DiskFull", 1)
    assert error.message == f"no space left on device (ENOSPC) writing {run_dir}/metrics.jsonl"
    assert root_error(tmp_path / "another", beats) is None  # another run's pool: not this error


def test_a_disk_full_in_a_worker_leaves_the_run_unfinished_not_failed(tmp_path):
    run = run_config(TRAINING)
    store = Store(tmp_path / "store")

    def launch(job):
        raise WorkerFailure(
            ErrorInfo("DiskFull", f"no space left on device (ENOSPC) writing {job.run_dir}/x.pt", rank=1)
        )

    with pytest.raises(DiskFull, match=r"writing .*\.partial/x\.pt$") as stopped:
        execute_run(run, store, launch=launch)
    assert stopped.value.path == store.partial_dir(run.run_id()) / "x.pt"
    assert store.status(run.run_id()) == "running"
    assert not (store.partial_dir(run.run_id()) / "status.json").exists()


class FillsUp:
    """A workload whose disk is full when batch 2 of epoch 1 is drawn, once."""

    def __init__(self, inner: workloads.Workload) -> None:
        self.inner = inner
        self.full = True

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def train_batches(self, rank, world_size, batch_size, epoch, seed, device):
        for i, data in enumerate(self.inner.train_batches(rank, world_size, batch_size, epoch, seed, device)):
            if (epoch, i) == (1, 2) and self.full:
                self.full = False
                raise OSError(errno.ENOSPC, "No space left on device", "/data/shard.bin")
            yield data


def test_a_disk_full_in_a_run_trained_here_leaves_it_resumable(tmp_path):
    run = run_config({**TRAINING, "engine": "simulated"})
    whole, store = Store(tmp_path / "whole"), Store(tmp_path / "store")
    assert execute_run(run, whole) == "completed"
    workload = FillsUp(workloads.build(run.workload))
    with pytest.raises(DiskFull, match=r"^no space left on device \(ENOSPC\) writing /data/shard\.bin$"):
        execute_run(run, store, workload=workload)
    partial = store.partial_dir(run.run_id())
    assert store.status(run.run_id()) == "running" and not (partial / "status.json").exists()
    assert execute_run(run, store, workload=workload, resume=True) == "completed"
    done = store.run_dir(run.run_id())
    assert json.loads((done / "status.json").read_text())["resumed"] != []
    assert untimed_rows(done) == untimed_rows(whole.run_dir(run.run_id()))
