"""Faults survived and nothing lost: a study stopped by SIGTERM, a localsgd train killed by
SIGKILL, a frozen worker, a worker killed mid-run under torch's elastic restarts, a second
study on a busy store. Each run is checked against the same run done in one go: the same
final parameters (bitwise) and the same metrics rows. While runs are in progress, the
sockets their processes listen on are listed: loopback only."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import harness
from harness import LAUNCHER_VARS, untimed_rows
from localsgd.engines.processes.engine import PROCESSES
from localsgd.records import Store
from localsgd.run.config import run_config
from localsgd.run.execute import execute_run

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

FAULTY = '''
import os, signal, time
from pathlib import Path

from localsgd import workloads


def make(*, gate: str = "", die: str = "", at_epoch: int = 1, at_batch: int = 0):
    """mnist1d_mlp, with a fault at batch `at_batch` of epoch `at_epoch`: rank 0 waits there
    until the file GATE.open exists (saying so in GATE.waiting); rank 1 kills itself there
    once (leaving the file DIE)."""
    base = workloads.build("mnist1d_mlp", num_samples=1000)
    original = base.train_batches

    def train_batches(rank, world_size, batch_size, epoch, seed, device):
        for i, data in enumerate(original(rank, world_size, batch_size, epoch, seed, device)):
            if (epoch, i) == (at_epoch, at_batch):
                if gate and rank == 0 and not Path(gate + ".open").exists():
                    Path(gate + ".waiting").write_text(str(os.getpid()))
                    while not Path(gate + ".open").exists():
                        time.sleep(0.02)
                if die and rank == 1 and not Path(die).exists():
                    Path(die).write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)
            yield data

    base.train_batches = train_batches
    return base
'''

# 720 training samples (800 less the validation split), K = 2, B = 16: 22 steps an epoch;
# local SGD syncs every 2nd step, so with checkpoint_every = 4 the checkpoints fall at steps
# 4, 8, ..., 20 before a fault at the first batch of epoch 1 (step 23).
TRAINING = harness.FAULT_TRAINING
PLAIN = harness.FAULT_WORKLOAD


@pytest.fixture(scope="module")
def cache(data_cache: str) -> Path:
    """The session's data cache: MNIST-1D is generated once, not in every test."""
    return Path(data_cache)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    """tmp_path as the current directory, with the faulty workload importable there."""
    (tmp_path / "faulty.py").write_text(FAULTY)
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def uninterrupted(uninterrupted_run: Path) -> Path:
    """The run trained in one go (its own launcher), as every interrupted one must end."""
    return uninterrupted_run


def rows(run_dir: Path) -> list[dict]:
    return untimed_rows(run_dir)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    harness.assert_same_run(run_dir, reference, list(range(5, 41, 5)))


def cli_env() -> dict[str, str]:
    """This process's environment (the project fixture's cache), without torchrun's variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1")
    return env


def cli(args: list[str], cwd: Path, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "localsgd.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=cwd,
        **popen,  # type: ignore[arg-type]
    )


def wait_for(path: Path, proc: subprocess.Popen[str] | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} first:\n{proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


# -- processes and their sockets ---------------------------------------------------------


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    from localsgd.util.lifetime import process_alive

    return {pid for pid in pids if process_alive(pid)}


def assert_all_gone(pids: set[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pids), f"still running: {sorted(alive(pids))}"


def listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket the processes listen on."""
    owner = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owner[int(link[8:-1])] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or int(fields[9]) not in owner:
                    continue
                host, port = fields[1].split(":")
                raw = bytes.fromhex(host)
                ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                found.append((owner[int(fields[9])], str(ip), int(port, 16)))
    return found


def assert_loopback_only(pids: set[int], at_least: int) -> None:
    sockets = listening(pids)
    assert len(sockets) >= at_least, sockets
    exposed = [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"


# -- the faults ---------------------------------------------------------------------------


def study_file(path: Path, gate: Path) -> Path:
    workload = {"name": "faulty:make", "gate": str(gate)}
    lines = ['[study]\nname = "faults"\n[base]\nworkers = 2\ndevice = "cpu"\n']
    lines.append("[base.workload]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in workload.items()))
    lines.append('[base.algorithm]\nname = "local_sgd"\nperiod = 2\n[base.data]\nbatch_size = 16\n')
    lines.append("[base.train]\nepochs = 2\nmax_steps = 40\neval_every = 5\ncheckpoint_every = 4\n")
    lines.append("[[grid]]\nseed = [0]\n")
    path.write_text("".join(lines))
    return path


def test_a_study_stopped_by_sigterm_on_a_busy_store_resumes_where_it_was(project, uninterrupted):
    gate = project / "gate"
    study = study_file(project / "faults.toml", gate)
    first = cli(["study", str(study), "--out", "store"], project)
    try:
        wait_for(gate.with_name("gate.waiting"), first)  # mid-run, after the checkpoint of step 20
        tree = descendants(first.pid)
        # The pool's launcher (2 stores) and its 2 workers (gloo): loopback only.
        assert_loopback_only({first.pid, *tree}, at_least=4)
        plan = (project / "store" / "plan.json").read_text()
        second = cli(["study", str(study), "--out", "store"], project)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"error: store store is in use by PID {first.pid} (" in err and "Traceback" not in err
        assert (project / "store" / "plan.json").read_text() == plan
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "study faults stopped by SIGTERM: its workers are stopped" in err and "Traceback" not in err
    assert_all_gone(tree)
    (run,) = (project / "store" / "runs").glob("*.partial")
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 20

    gate.with_name("gate.open").touch()
    again = cli(["study", str(study), "--out", "store"], project)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "study faults: 1 completed" in out
    done = project / "store" / "runs" / run.name.removesuffix(".partial")
    status = json.loads((done / "status.json").read_text())
    assert status["status"] == "completed" and status["resumed"] == [20]
    assert_same_run(done, uninterrupted)


def test_a_killed_train_takes_its_workers_along_and_resumes_with_its_flag(project, uninterrupted):
    gate = project / "gate"
    config = project / "run.toml"
    study_file(config, gate)
    text = config.read_text().split("[base]\n", 1)[1].split("[[grid]]")[0].replace("base.", "")
    config.write_text(text)
    train = cli(["train", str(config), "--out", "store"], project)
    try:
        wait_for(gate.with_name("gate.waiting"), train)
        tree = descendants(train.pid)
        assert_loopback_only(tree, at_least=4)  # the run's own launcher and workers
        train.kill()  # SIGKILL: nothing of localsgd runs in the killed process
        train.wait()
    finally:
        if train.poll() is None:
            train.kill()
    assert_all_gone(tree)
    (partial,) = (project / "store" / "runs").glob("*.partial")

    gate.with_name("gate.open").touch()
    resumed = cli(["train", "--resume", str(partial.relative_to(project))], project)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert out.splitlines()[0] == "resuming from the checkpoint of step 20"
    done = partial.with_name(partial.name.removesuffix(".partial"))
    assert json.loads((done / "status.json").read_text())["resumed"] == [20]
    assert_same_run(done, uninterrupted)
    again = cli(["train", "--resume", str(done)], project)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 2 and "the run is completed; there is nothing to resume" in err


def run_in_thread(target, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def go() -> None:
        try:
            result["status"] = target(*args, **kwargs)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("where", ["pool", "launch"])
def test_a_frozen_worker_fails_its_run_naming_its_rank(project, where):
    gate = project / "gate"
    training = {**TRAINING, "train": {**TRAINING["train"], "timeout_seconds": 6}}
    run = run_config({**training, "workload": {"name": "faulty:make", "gate": str(gate)}})
    store = Store(project / "store")
    with PROCESSES.session() as session:
        thread, result = run_in_thread(
            execute_run, run, store, session=session if where == "pool" else None
        )
        wait_for(gate.with_name("gate.waiting"))
        if where == "pool":
            frozen = session.pools[0].pids[1]
        else:
            # The launcher forks its workers; each names itself by its rank.
            (frozen,) = (
                pid
                for pid in descendants(os.getpid())
                if Path(f"/proc/{pid}/comm").read_text().strip() == "localsgd r1"
            )
        os.kill(frozen, signal.SIGSTOP)
        gate.with_name("gate.open").touch()  # rank 0 goes on, into a collective with rank 1
        # The join's limit only keeps a broken watch from stalling the suite; what failed
        # the run is the heartbeat check at train.timeout_seconds, as its message says.
        thread.join(120)
    assert not thread.is_alive() and result.get("status") == "failed", result
    error = store.error(run.run_id())
    assert error is not None and error.type == "WorkerUnresponsive" and error.rank == 1
    assert error.line().startswith(f"WorkerUnresponsive: rank 1 (pid {frozen}) stopped answering: no heartbeat for")
    assert "(train.timeout_seconds = 6)" in error.message
    assert_all_gone({frozen})


def test_a_worker_killed_mid_run_restarts_the_group_which_resumes_exactly(project, uninterrupted):
    die = project / "died"
    training = {**TRAINING, "train": {**TRAINING["train"], "max_restarts": 1}}
    run = run_config({**training, "workload": {"name": "faulty:make", "die": str(die), "at_batch": 3}})
    store = Store(project / "store")
    with PROCESSES.session() as session:  # a run with restarts gets a launch of its own
        assert execute_run(run, store, session=session) == "completed"
        assert session.pools == ()
    killed = int(die.read_text())
    assert not alive({killed})
    done = store.run_dir(run.run_id())
    status = json.loads((done / "status.json").read_text())
    assert status["status"] == "completed" and status["resumed"] == [24]  # killed at step 26
    assert_same_run(done, uninterrupted)
    log = (done / "workers.log").read_text()
    assert "resumed from the checkpoint of step 24" in log


def own_listeners(rank: int, world_size: int) -> list[tuple[int, str, int]]:
    import torch.distributed as dist

    dist.barrier()
    return listening({os.getpid()})


def test_a_group_started_by_hand_on_loopback_listens_on_loopback_only():
    """torchrun-style variables with MASTER_ADDR=127.0.0.1 (a Slurm job on one node, the
    test harness): rank 0's store listens there alone, not on every interface."""
    from harness import run_world

    results = run_world(own_listeners, 2, timeout=120)
    assert len(results[0]) > len(results[1]), results  # rank 0 hosts the store
    sockets = [s for rank in results for s in rank]
    assert all(ipaddress.ip_address(address).is_loopback for _, address, _ in sockets), sockets
