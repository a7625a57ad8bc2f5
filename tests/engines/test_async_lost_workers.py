"""An asynchronous run goes on without a lost worker: SIGKILL of a non-server worker under
``localsgd train`` and under a study (real processes, gloo on loopback), the run completes
with the rest and says which rank it lost, at which version; killing rank 0 (the parameter
server) fails the run naming it; a failed run's record says how far it got and points at
log files that exist. A hand-run torchrun cannot go on: rank 0 says so at the start, and
the failure names the lost rank.

Every worker waits at a gate (batch 4 of epoch 0, after 4 steps and 2 pushes of H = 2)
until the file ``gate.open`` exists, so the kill falls at a known point: the server's version
is then 3 workers x 2 pushes = 6, and every push after it comes from the survivors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import LAUNCHER_VARS, wait_until, worker_command
from localsgd.records.record import ErrorInfo, MetricsRow, read_json, to_json
from localsgd.records.store import Store
from localsgd.run.worker import TORCHRUN_NOTE

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and /proc"),
]

GATED = '''
import os, time
from pathlib import Path

from localsgd import workloads


def make(*, gate: str = "", at_batch: int = 4):
    """mnist1d_mlp whose every rank waits at batch `at_batch` of epoch 0 (writing its pid to
    GATE.rank<r>) until the file GATE.open exists."""
    base = workloads.build("mnist1d_mlp", num_samples=1000)
    original = base.train_batches

    def train_batches(rank, world_size, batch_size, epoch, seed, device):
        for i, data in enumerate(original(rank, world_size, batch_size, epoch, seed, device)):
            if gate and (epoch, i) == (0, at_batch):
                Path(f"{gate}.rank{rank}").write_text(str(os.getpid()))
                while not Path(gate + ".open").exists():
                    time.sleep(0.02)
            yield data

    base.train_batches = train_batches
    return base
'''

# 720 training samples (1000 less the test and validation splits), K = 3, B = 16: 15 steps an
# epoch per worker, 30 in all.
RUN = """workers = 3
device = "cpu"
[workload]
name = "gated:make"
gate = "{gate}"
[algorithm]
name = "async_local_sgd"
period = 2
[data]
batch_size = 16
[train]
epochs = 2
eval_every = 4
"""
AT_GATE = 6
"""The server's version while every worker waits at the gate: 3 workers, 2 pushes each."""
LOST_LINE = f"1 worker lost: rank 2 at version {AT_GATE} (SIGKILL)"


@pytest.fixture(scope="module")
def cache(data_cache: str) -> Path:
    return Path(data_cache)


@pytest.fixture
def project(tmp_path: Path, cache: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "gated.py").write_text(GATED)
    (tmp_path / "run.toml").write_text(RUN.format(gate=tmp_path / "gate"))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(cache))
    return tmp_path, env


def cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "localsgd.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def at_gate(cwd: Path, proc: subprocess.Popen[str]) -> Path:
    """Wait until all 3 workers wait at the gate; the run's (unfinished) folder."""
    wait_until(lambda: all((cwd / f"gate.rank{r}").exists() for r in range(3)), proc, "the gate")
    (partial,) = (cwd / "store" / "runs").glob("*.partial")
    return partial


def launched_pids(run_dir: Path) -> dict[int, int]:
    """The workers' pids, as the launch wrote them; each is the process at the gate."""
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["launcher"] == "tolerant"  # not torch's elastic launcher, not a pool
    pids = {int(rank): pid for rank, pid in launch["pids"].items()}
    gated = {r: int((run_dir.parents[2] / f"gate.rank{r}").read_text()) for r in range(3)}
    assert pids == gated
    return pids


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def kill_rank_2_and_go_on(cwd: Path, proc: subprocess.Popen[str]) -> tuple[Path, list[int]]:
    """SIGKILL rank 2 at the gate, wait until the server has lost it, open the gate; the
    run folder and rank 0's logged steps before the kill."""
    partial = at_gate(cwd, proc)
    before = steps(partial)
    os.kill(launched_pids(partial)[2], signal.SIGKILL)
    log = partial / "workers.log"
    wait_until(lambda: "parameter server: lost worker 2" in log.read_text(errors="replace"), proc, "the loss")
    (cwd / "gate.open").touch()
    return partial, before


def assert_went_on_without_rank_2(run_dir: Path, before: list[int]) -> None:
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["error"] is None
    assert status["details"]["lost_ranks"] == {"2": "SIGKILL"}
    server = status["details"]["server"]
    assert server["lost_workers"] == {"2": AT_GATE}
    # Rank 2 pushed twice before the gate, never after; ranks 0 and 1 went on pushing.
    pushes = server["pushes_per_worker"]
    assert pushes[2] == 2 and pushes[0] > 2 and pushes[1] > 2
    assert server["updates"] == sum(pushes) > AT_GATE
    assert status["final"]["updates"] == server["updates"]
    # Rank 0 logged evaluations after the kill, to the end of its steps.
    after = steps(run_dir)
    assert before and max(after) > max(before)
    assert status["steps"] == max(after) == 30


def test_train_goes_on_without_a_killed_worker_and_says_so(project):
    cwd, env = project
    proc = cli(["train", "run.toml", "--out", "store"], cwd, env)
    try:
        partial, before = kill_rank_2_and_go_on(cwd, proc)
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    final = partial.with_name(partial.name.removesuffix(".partial"))
    assert_went_on_without_rank_2(final, before)
    result = [line for line in out.splitlines() if line.startswith("completed")]
    assert len(result) == 1 and result[0].startswith(f"completed, {LOST_LINE}: test accuracy ")
    assert result[0].endswith(")") and " after 30 steps (" in result[0]
    assert "rank 2 was lost (SIGKILL); the others go on without it" in err


def test_a_study_goes_on_without_a_killed_worker_and_says_so(project):
    cwd, env = project
    run = (cwd / "run.toml").read_text().replace("[", "[base.")
    (cwd / "study.toml").write_text(f'[study]\nname = "lost"\n[base]\n{run}[[grid]]\nseed = [0]\n')
    proc = cli(["study", "study.toml", "--out", "store"], cwd, env)
    try:
        partial, before = kill_rank_2_and_go_on(cwd, proc)
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "study lost: 1 completed" in out
    (line,) = [line for line in out.splitlines() if "async_local_sgd" in line and "completed" in line]
    assert line.endswith(LOST_LINE)
    assert_went_on_without_rank_2(partial.with_name(partial.name.removesuffix(".partial")), before)


def test_killing_the_server_fails_the_run_naming_rank_0_with_what_it_got_done(project):
    cwd, env = project
    proc = cli(["train", "run.toml", "--out", "store"], cwd, env)
    try:
        partial = at_gate(cwd, proc)
        assert steps(partial) == [4]  # rank 0's evaluation after its 4 steps
        os.kill(launched_pids(partial)[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    final = partial.with_name(partial.name.removesuffix(".partial"))
    status = json.loads((final / "status.json").read_text())
    assert status["status"] == "failed" and status["steps"] == 4
    error = status["error"]
    assert error["type"] == "ServerLost" and error["rank"] == 0
    assert "rank 0, which hosts the parameter server, ended with SIGKILL" in error["message"]
    # The log it points at is where the run folder is now, not where it was.
    named = cwd / error["message"].rsplit("(see ", 1)[1].rstrip(")")
    assert named == final / "workers.log" and named.exists()
    assert out.splitlines()[-2].startswith("failed: test accuracy ") and " after 4 steps (" in out
    assert "error: ServerLost: rank 0, which hosts the parameter server, ended with SIGKILL" in err
    assert "(rank 0)" in err.splitlines()[-1]


def test_a_failed_record_takes_its_steps_from_the_rows_and_its_paths_from_the_final_folder(tmp_path):
    store = Store(tmp_path / "store")
    partial = store.begin("r1", "r1", {"workers": 2})
    rows = [
        MetricsRow(
            step=s, epoch=s / 10, samples=32 * s, wall_seconds=0.5 * s, lr=0.1, train_loss=1.0, metrics={}
        )
        for s in (10, 20)
    ]
    (partial / "metrics.jsonl").write_text("".join(json.dumps(to_json(r)) + "\n" for r in rows))
    (partial / "workers.log").write_text("gloo: connection closed\n")
    log = partial / "workers.log"
    error = ErrorInfo("WorkersExited", f"workers exited with code 1 (see {log})", f"tail of {log}")
    assert store.finish("r1", error=error) == "failed"
    final = store.run_dir("r1")
    status = read_json(final / "status.json")
    assert (status["steps"], status["wall_seconds"], status["samples"]) == (20, 10.0, 640)
    assert status["error"]["message"] == f"workers exited with code 1 (see {final / 'workers.log'})"
    assert status["error"]["traceback"] == f"tail of {final / 'workers.log'}"
    assert (final / "workers.log").exists()


def test_under_a_hand_run_torchrun_a_lost_worker_ends_the_run_naming_it(project):
    cwd, env = project
    proc = subprocess.Popen(
        worker_command(3, "run.toml", "--out", "store"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    try:
        wait_until(lambda: all((cwd / f"gate.rank{r}").exists() for r in range(3)), proc, "the gate")
        os.kill(int((cwd / "gate.rank2").read_text()), signal.SIGKILL)
        _, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert err.count(TORCHRUN_NOTE) == 1
    (record,) = (cwd / "store" / "runs").iterdir()
    status = json.loads((record / "status.json").read_text())
    assert status["status"] == "failed" and status["steps"] == 4
    assert status["error"]["type"] == "StoppedAfterLoss" and status["error"]["rank"] == 0
    # Ranks the agent stopped may be lost too, after rank 2.
    assert f"a worker was lost (rank 2 at version {AT_GATE}" in status["error"]["message"]


def test_a_rank_that_exits_badly_after_finishing_its_part_is_not_lost(tmp_path, caplog):
    from localsgd.engines.launching.tolerant import _note_lost

    status = {"version": 1, "status": "completed", "details": {"server": {"lost_workers": {"2": 6}}}}
    (tmp_path / "status.json").write_text(json.dumps(status))
    _note_lost(tmp_path, {1: "SIGABRT", 2: "SIGKILL"})
    details = json.loads((tmp_path / "status.json").read_text())["details"]
    assert details["lost_ranks"] == {"2": "SIGKILL"}
    assert "rank 1 had finished its part, then exited with SIGABRT" in caplog.text
