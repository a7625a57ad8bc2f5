"""Emulated multi-node clusters for real (root: network namespaces, veth pairs, tc):

- 2 namespaces × 2 processes of hierarchical local SGD (a block per node) reach the
  parameters of the single-node 4-process run on the same data;
- the links are shaped, and calibration writes a cluster file the cost model reads;
- nothing is left behind (namespaces, processes) after a job that failed, or a command
  interrupted with SIGINT or SIGTERM; namespaces the emulation did not create stay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from harness import LAUNCHER_VARS
from localsgd import engines
from localsgd.cli import app
from localsgd.costmodel import load_cluster
from localsgd.emulation import EmulatedCluster, EmulatedNetwork, NetworkSpec, cleanup_stale, unavailable
from localsgd.emulation.network import STATE_DIR, namespace_pids, namespaces
from localsgd.records import Store
from localsgd.run.config import run_config
from localsgd.run.execute import execute_run

WHY = unavailable()
pytestmark = [pytest.mark.skipif(WHY is not None, reason=WHY or ""), pytest.mark.timeout(600)]


def hierarchical(workers: int, **extra: object) -> object:
    return run_config(
        {
            "workload": {"name": "mnist1d_mlp", "num_samples": 1000},
            "workers": workers,
            "device": "cpu",
            "seed": 5,
            "algorithm": {"name": "hierarchical_local_sgd", "period": 2, "block_period": 3, "block_size": 2},
            "data": {"batch_size": 16},
            "optimizer": {"lr": 0.05},
            "train": {"epochs": 2, "max_steps": 14, "eval_every": 7},
            **extra,
        }
    )


def gone(cluster: EmulatedCluster) -> None:
    """Nothing of ``cluster`` remains: no namespace of its identity, no process it ran."""
    ident = cluster.network.ident
    assert not [n for n in namespaces() if n.startswith(ident)]
    assert not (STATE_DIR / f"{ident}.json").exists()
    assert cluster.network.pids() == []


def running(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (a test's own folder), or that run
    in it: a launcher forked from a launcher server, and the workers forked from it, carry
    the server's command line, and the directory of the command that started them."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cwd = os.readlink(entry / "cwd")
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace") or cwd.startswith(marker):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Whatever a test does, emulations whose owner died (a subprocess it started) are
    removed after it, so that even a failing test leaves no namespace behind."""
    yield
    cleanup_stale()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_cache: str) -> Path:
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_two_nodes_of_two_equal_one_node_of_four(env: Path) -> None:
    config = hierarchical(4)
    single, emulated = Store(env / "single"), Store(env / "emulated")
    assert execute_run(config, single) == "completed", single.error(config.run_id())
    with EmulatedCluster(2, 2) as cluster:
        status = execute_run(config, emulated, launch=cluster.execute)
        assert status == "completed", emulated.error(config.run_id())
        logs = (emulated.run_dir(config.run_id()) / "nodes").iterdir()
        # Each node's workers bound gloo to their node's own link.
        assert sorted(p.name for p in logs) == ["node0.log", "node1.log"]
    gone(cluster)
    a = torch.load(single.run_dir(config.run_id()) / "checkpoint.pt")["model"]
    b = torch.load(emulated.run_dir(config.run_id()) / "checkpoint.pt")["model"]
    for key, tensor in a.items():
        err = float((tensor - b[key]).norm() / tensor.norm().clamp_min(1e-12))
        assert err <= 1e-6, f"{key}: relative error {err:.2e}"
    counters = json.loads((emulated.run_dir(config.run_id()) / "status.json").read_text())["counters"]
    # Block averages at steps 2, 4, 8, 10, 14; global ones at 6, 12 and on exit.
    assert counters["by_scope"]["block2"]["collectives"] == 5
    assert counters["by_scope"]["world"]["collectives"] == 3


def test_links_are_shaped_and_calibration_writes_a_cluster_file(env: Path) -> None:
    out = env / "cluster.toml"
    command = [sys.executable, "-m", "localsgd.cli", "cluster", "calibrate", "--out", str(out)]
    command += ["--nodes", "2", "--procs-per-node", "2", "--rate", "100mbit"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    cluster = load_cluster(out)
    assert cluster.devices_per_node == 2 and cluster.allreduce == "ring"
    assert cluster.intra is not None and cluster.name == "emulated-2x2-100mbit"
    # tbf caps the link at 100 Mbit/s: what gloo's payload gets cannot exceed it.
    assert 0 < cluster.inter.bandwidth * 8 <= 1.02e8
    assert "cluster file:" in done.stdout and "Mbit/s" in done.stdout
    # Every codec's work timed on this CPU, so report --cluster prices compressed runs.
    from localsgd.comm.codecs import codec_names

    assert sorted(cluster.codecs) == sorted(codec_names()[1:])
    # Per value: nanoseconds on a CPU (a fit on a busy machine may put either term at 0).
    assert all(0 <= c.encode < 1e-6 and 0 <= c.decode < 1e-6 for c in cluster.codecs.values())
    assert all(c.encode + c.decode > 0 for c in cluster.codecs.values())
    assert "int8" in done.stdout and "[codecs.int8]" in out.read_text()


FLAKY = """
from localsgd import workloads


def make():
    base = workloads.build("mnist1d_mlp", num_samples=1000)
    original = base.train_batches

    def train_batches(rank, world_size, batch_size, epoch, seed, device):
        if rank == 1:
            raise KeyError(f"shard {rank} is missing from the bucket")
        return original(rank, world_size, batch_size, epoch, seed, device)

    base.train_batches = train_batches
    return base
"""


def test_a_failed_job_is_the_workers_error_and_leaves_nothing_behind(env: Path) -> None:
    (env / "flaky.py").write_text(FLAKY)
    config = hierarchical(2, workload={"name": "flaky:make"})
    store = Store(env / "store")
    with EmulatedCluster(2, 1, "1gbit") as cluster:
        assert execute_run(config, store, launch=cluster.execute) == "failed"
    gone(cluster)
    error = store.error(config.run_id())
    assert error is not None and (error.type, error.rank) == ("KeyError", 1)
    assert "missing from the bucket" in error.message
    assert running(str(env)) == []


SLOW = """
import time

from localsgd import workloads


def make():
    base = workloads.build("mnist1d_mlp", num_samples=1000)

    def train_batches(rank, world_size, batch_size, epoch, seed, device):
        time.sleep(600)
        yield from ()

    base.train_batches = train_batches
    return base
"""


@pytest.mark.parametrize(
    ("sig", "ignored"),
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["SIGINT", "SIGINT-inherited-ignored", "SIGTERM"],
)
def test_an_interrupted_emulation_leaves_nothing_behind(env: Path, sig: signal.Signals, ignored: bool) -> None:
    (env / "slow.py").write_text(SLOW)
    (env / "run.toml").write_text('workers = 2\ndevice = "cpu"\n[workload]\nname = "slow:make"\n')
    command = [sys.executable, "-m", "localsgd.cli", "cluster", "emulate", "run.toml", "--nodes", "2"]
    # A job a shell without job control puts in the background starts with SIGINT ignored.
    start = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None
    proc = subprocess.Popen(
        [*command, "--procs-per-node", "1", "--out", str(env / "store")], cwd=env, preexec_fn=start
    )
    try:
        # Wait until every node's launcher and worker run inside their namespaces, so that
        # the signal comes while training, not while the launchers are being started.
        deadline = time.monotonic() + 240
        state = None
        while time.monotonic() < deadline and proc.poll() is None:
            mine = [p for p in STATE_DIR.glob("lsgd*.json") if json.loads(p.read_text())["pid"] == proc.pid]
            logs = list((env / "store").glob("runs/*.partial/nodes/node*.log"))
            if mine and len(logs) == 2:
                nodes = [n for n in json.loads(mine[0].read_text())["namespaces"] if "node" in n]
                if len(nodes) == 2 and all(len(namespace_pids(n)) >= 2 for n in nodes):
                    state = json.loads(mine[0].read_text())
                    break
            time.sleep(0.2)
        assert state is not None, "the emulated job did not start"
        created = state["namespaces"]
        assert len(created) == 3 and set(created) <= set(namespaces())
        proc.send_signal(sig)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not set(created) & set(namespaces())
    assert running(str(env)) == [] and running("slow:make") == []


WHERE = """
import json, os, sys
parent = os.getppid()
print("where " + json.dumps({
    "netns": os.readlink("/proc/self/ns/net"),
    "launcher_netns": os.readlink(f"/proc/{parent}/ns/net"),
    "launcher": open(f"/proc/{parent}/cmdline", "rb").read().decode().split("\\0"),
    "cwd": os.getcwd(),
}), flush=True)
"""


@pytest.mark.parametrize("served", [True, False], ids=["served", "started"])
def test_each_nodes_launcher_runs_inside_its_namespace(env: Path, served: bool, monkeypatch) -> None:
    """Forked from this process's launcher server into the node's network namespace, or
    started there by ``ip netns exec``: the launcher and its workers are inside it."""
    (env / "where.py").write_text(WHERE)
    if not served:
        monkeypatch.setenv("LOCALSGD_LAUNCHER_SERVER", "0")
    with EmulatedCluster(2, 1) as cluster:
        inodes = [f"net:[{os.stat(f'/run/netns/{name}').st_ino}]" for name in cluster.network.nodes]
        assert cluster.run([str(env / "where.py")], log_dir=env / "logs", timeout=120) == [0, 0]
    gone(cluster)
    for node, inode in enumerate(inodes):
        [line] = [x for x in (env / "logs" / f"node{node}.log").read_text().splitlines() if x.startswith("where ")]
        where = json.loads(line.removeprefix("where "))
        assert where["netns"] == where["launcher_netns"] == inode
        assert where["cwd"] == str(env)
        module = "localsgd.engines.launching.server" if served else "localsgd.engines.launching.elastic"
        assert where["launcher"][1:3] == ["-m", module]


def test_namespaces_it_did_not_create_are_left_alone(env: Path) -> None:
    foreign = EmulatedNetwork(NetworkSpec(1))  # someone else's, named like ours
    foreign.up()
    try:
        with EmulatedCluster(2, 1) as cluster:
            assert foreign.nodes[0] in namespaces()
        gone(cluster)
        assert cleanup_stale() == []  # its owner (this process) is alive
        assert foreign.nodes[0] in namespaces() and foreign.switch in namespaces()
        assert engines.get("processes").processes(2) == 2
    finally:
        foreign.down()
    assert foreign.nodes[0] not in namespaces()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "fast"], "error: rate must be a positive tc rate such as '100mbit'"),
        (["--nodes", "0"], r"error: nodes must be an integer in [1, 250], got 0"),
        (
            ["--nodes", "3"],
            "takes 4 processes; the emulated cluster runs 6 (3 nodes × 2) or one in this process",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2_before_anything_exists(
    env: Path, args: list[str], message: str
) -> None:
    (env / "run.toml").write_text(
        'workers = 4\ndevice = "cpu"\n[workload]\nname = "mnist1d_mlp"\nnum_samples = 1000\n'
    )
    done = CliRunner().invoke(app, ["cluster", "emulate", "run.toml", "--out", "store", *args])
    assert done.exit_code == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (env / "store").exists()


HARD_KILLED = """
import sys, time
from localsgd.emulation.network import EmulatedNetwork, NetworkSpec
network = EmulatedNetwork(NetworkSpec(2, "100mbit")).up()
print(network.ident, flush=True)
time.sleep(600)
"""


def test_cleanup_removes_what_a_hard_killed_emulation_left(env: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HARD_KILLED], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ident = proc.stdout.readline().strip()
        left = sorted(n for n in namespaces() if n.startswith(f"{ident}-"))
        assert left == [f"{ident}-node0", f"{ident}-node1", f"{ident}-switch"]
    finally:
        proc.kill()  # SIGKILL: no teardown runs
        proc.wait()
    assert set(left) <= set(namespaces())
    done = subprocess.run(
        [sys.executable, "-m", "localsgd.cli", "cluster", "cleanup"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in left), (done.stdout, left)
    assert not set(left) & set(namespaces()) and not (STATE_DIR / f"{ident}.json").exists()
