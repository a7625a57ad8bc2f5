"""Faults of whole nodes and links on the emulated cluster (root: namespaces, veth, tc):

- one node's workers killed mid-run: with ``train.max_restarts`` the group restarts on
  every node and resumes from its checkpoint, ending as the uninterrupted run does (the
  same parameters bit for bit, the same metrics rows); without, the run fails naming the
  node, its namespace and the killed rank;
- a node's link taken down and brought back: a short outage is ridden through; one longer
  than ``train.timeout_seconds`` fails the run naming the unreachable node;
- the rendezvous listens on node 0's address alone, and node 1 reaches it there;
- an asynchronous run goes on without a node other than rank 0's that lost its workers,
  naming them; rank 0 says at the start that a loss on its own node would end the run.

Faults are injected once the run has written its first checkpoint or metrics row (files
awaited, never timed).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import harness
from harness import LAUNCHER_VARS
from localsgd.emulation import EmulatedCluster, cleanup_stale, unavailable
from localsgd.emulation import cluster as emulated
from localsgd.emulation.cluster import RDZV_PORT
from localsgd.emulation.network import namespace_pids
from localsgd.records import Store
from localsgd.records.record import lost_line
from localsgd.records.store import CHECKPOINTS, LATEST
from localsgd.run.config import RunConfig, run_config
from localsgd.run.execute import execute_run
from localsgd.run.worker import TORCHRUN_NOTE

WHY = unavailable()
# The xdist worker that runs every emulation test (tests/conftest.py: EXCLUSIVE_FOLDERS) runs
# this module too, so its uninterrupted emulated run is built once per session, and its
# clean-up of stale emulations never runs beside another module's emulation.
pytestmark = [
    pytest.mark.skipif(WHY is not None, reason=WHY or ""),
    pytest.mark.timeout(600),
    pytest.mark.xdist_group("emulation"),
]

# 720 training samples, K = 2, B = 16: 22 steps an epoch; local SGD averages every 2nd step.
TRAINING = {
    "workers": 2,
    "device": "cpu",
    "algorithm": {"name": "local_sgd", "period": 2},
    "data": {"batch_size": 16},
}
# train.timeout_seconds of the tests that wait it out on purpose (an outage longer than it, a
# rendezvous that a lost node never joins, torch's exit barrier): short, but seconds beyond
# what two workers of a loaded machine take to start and to meet at a collective.
TIMEOUT = 8


def training(max_steps: int = 40, workload: str = "mnist1d_mlp", **train: object) -> RunConfig:
    steps = {"epochs": 3, "max_steps": max_steps, "eval_every": 5, "checkpoint_every": 4}
    workload_table = (
        {"name": workload, "num_samples": 1000} if workload == "mnist1d_mlp" else {"name": workload}
    )
    return run_config({**TRAINING, "workload": workload_table, "train": {**steps, **train}})


@pytest.fixture(scope="module")
def cache(data_cache: str) -> Path:
    return Path(data_cache)


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> Iterator[Path]:
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    # The survivors of a failed node are stopped sooner than a real job's would be: what
    # they do in the meantime is no part of what these tests check.
    monkeypatch.setattr(emulated, "FAILURE_GRACE", 2.0)
    yield tmp_path
    cleanup_stale()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """The run trained in one go on 2 emulated nodes × 1 process."""
    store = Store(tmp_path_factory.mktemp("uninterrupted"))
    config = training(max_restarts=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        mp.setenv("OMP_NUM_THREADS", "1")
        with EmulatedCluster(2, 1) as cluster:
            assert execute_run(config, store, launch=cluster.execute) == "completed", store.error(
                config.run_id()
            )
    return store.run_dir(config.run_id())


def assert_same_run(run_dir: Path, reference: Path) -> None:
    harness.assert_same_run(run_dir, reference, list(range(5, 41, 5)))


def partial(store: Store) -> Path | None:
    found = list((store.root / "runs").glob("*.partial")) if (store.root / "runs").is_dir() else []
    return found[0] if found else None


def when(ready: Callable[[], bool], then: Callable[[], None], done: threading.Event) -> threading.Thread:
    """A thread that waits for ``ready()`` (polling files), then does ``then()``; it gives
    up when ``done`` is set first."""

    def watch() -> None:
        while not done.is_set():
            if ready():
                then()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def checkpointed(store: Store) -> Callable[[], bool]:
    """The run's first checkpoint is complete (rank 0 named it in ``latest.json``)."""

    def ready() -> bool:
        folder = partial(store)
        return folder is not None and (folder / CHECKPOINTS / LATEST).exists()

    return ready


def first_row(store: Store) -> Callable[[], bool]:
    def ready() -> bool:
        folder = partial(store)
        metrics = None if folder is None else folder / "metrics.jsonl"
        return metrics is not None and metrics.exists() and metrics.stat().st_size > 0

    return ready


def run_with_fault(
    config: RunConfig,
    store: Store,
    cluster: EmulatedCluster,
    ready: Callable[[], bool],
    fault: Callable[[], None],
) -> tuple[str, threading.Thread]:
    done = threading.Event()
    thread = when(ready, fault, done)
    try:
        status = execute_run(config, store, launch=cluster.execute)
    finally:
        done.set()
        thread.join()
    return status, thread


GATED = '''
import json, os, time
from pathlib import Path
from localsgd import workloads


def make():
    """mnist1d_mlp; each worker process notes its rank and attempt counters in starts.jsonl,
    and rank 0 stops at batch 12 of epoch 0 (step 13) the first time,
    saying so in the file gate, until its agent stops it."""
    start = {k: os.environ.get(k) for k in ("RANK", "TORCHELASTIC_RESTART_COUNT", "LOCALSGD_RDZV_ROUND")}
    with open("starts.jsonl", "a") as f:
        f.write(json.dumps(start) + "\\n")
    base = workloads.build("mnist1d_mlp", num_samples=1000)
    original = base.train_batches

    def train_batches(rank, world_size, batch_size, epoch, seed, device):
        for i, data in enumerate(original(rank, world_size, batch_size, epoch, seed, device)):
            if (rank, epoch, i) == (0, 0, 12) and not Path("gate").exists():
                Path("gate").write_text(str(os.getpid()))
                while True:
                    time.sleep(0.05)
            yield data

    base.train_batches = train_batches
    return base
'''


def test_a_node_whose_workers_are_killed_restarts_the_group_on_every_node_which_resumes_exactly(
    env: Path, uninterrupted: Path
) -> None:
    """Node 1's workers are killed while node 0's are busy (not in a collective): node 1's
    agent counts a restart, node 0's only follows it into the next rendezvous round, so
    torch's restart counts differ between the nodes; the group still forms (keyed by the
    round) and resumes from its last checkpoint."""
    (env / "gated.py").write_text(GATED)
    config = training(workload="gated:make", max_restarts=1)
    store = Store(env / "store")
    killed: list[int] = []
    with EmulatedCluster(2, 1) as cluster:
        fault = lambda: killed.extend(cluster.kill_node(1))  # noqa: E731
        ready = lambda: (env / "gate").exists() and checkpointed(store)()  # noqa: E731
        status, _ = run_with_fault(config, store, cluster, ready, fault)
    assert status == "completed", store.error(config.run_id())
    assert killed, "the fault was never injected"
    done = store.run_dir(config.run_id())
    # The last checkpoint before step 13, where rank 0 stopped.
    assert json.loads((done / "status.json").read_text())["resumed"] == [12]
    assert_same_run(done, uninterrupted)
    starts = [json.loads(line) for line in (env / "starts.jsonl").read_text().splitlines()]
    counts = sorted((s["RANK"], s["TORCHELASTIC_RESTART_COUNT"], s["LOCALSGD_RDZV_ROUND"]) for s in starts)
    assert counts == [("0", "0", "0"), ("0", "0", "1"), ("1", "0", "0"), ("1", "1", "1")]


def test_without_restarts_a_killed_node_fails_naming_the_node_and_rank(env: Path) -> None:
    config, store = training(), Store(env / "store")
    with EmulatedCluster(2, 1) as cluster:
        status, _ = run_with_fault(config, store, cluster, first_row(store), lambda: cluster.kill_node(1))
        namespace = cluster.network.nodes[1]
    assert status == "failed"
    error = store.error(config.run_id())
    assert error is not None and (error.type, error.rank) == ("WorkerKilled", 1)
    assert error.message == f"node 1 (namespace {namespace}): rank 1 (local rank 0) was killed by SIGKILL"
    # The rank comes from what node 1's launcher said after its rendezvous.
    node1 = (store.run_dir(config.run_id()) / "nodes" / "node1.log").read_text()
    assert "localsgd: rendezvous round 0: this node is group rank 1 of 2" in node1


def test_an_outage_longer_than_the_timeout_fails_naming_the_unreachable_node(env: Path) -> None:
    config, store = training(timeout_seconds=TIMEOUT), Store(env / "store")
    with EmulatedCluster(2, 1) as cluster:
        # Down until the run has failed: longer than the timeout, whatever it takes.
        status, _ = run_with_fault(config, store, cluster, first_row(store), lambda: cluster.link_down(1))
        namespace, link = cluster.network.nodes[1], cluster.network.interfaces[1]
    assert status == "failed"
    error = store.error(config.run_id())
    assert error is not None and (error.type, error.rank) == ("NodeUnreachable", 1)
    assert (
        error.message
        == f"node 1 (namespace {namespace}) is unreachable: its link {link} is down (ranks 1 ran there)"
    )


def sockets(namespace: str, state: str, column: int) -> set[tuple[str, int]]:
    """(address, port) in ``column`` (1: local, 2: remote) of every TCP socket in
    ``state`` (``0A``: listening, ``01``: established) in ``namespace``, read from the
    /proc/net of a process inside it."""
    pid = namespace_pids(namespace)[0]
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != state:
                continue
            host, port = fields[column].split(":")
            raw = bytes.fromhex(host)
            ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            found.add((str(ip), int(port, 16)))
    return found


def test_the_rendezvous_is_on_node_0s_address_alone_and_a_short_link_outage_is_ridden_through(
    env: Path, uninterrupted: Path
) -> None:
    """Node 0 listens on its own address alone (the rendezvous on RDZV_PORT among them),
    node 1 listens on nothing but its own and is connected to node 0's rendezvous; then
    node 1's link goes down for 1 s (longer than TCP's first retransmission timeout),
    within gloo's timeout: no restart, nothing changed."""
    config, store = training(max_restarts=1), Store(env / "store")
    seen: dict[str, set[tuple[str, int]]] = {}
    within: list[bool] = []
    with EmulatedCluster(2, 1) as cluster:

        def look_then_cut() -> None:
            seen["node0"] = sockets(cluster.network.nodes[0], "0A", 1)
            seen["node1"] = sockets(cluster.network.nodes[1], "0A", 1)
            seen["links"] = sockets(cluster.network.nodes[1], "01", 2)
            with cluster.link_outage(1):
                within.append(partial(store) is not None)
                time.sleep(1)  # the outage's length, not an assertion
            within.append(partial(store) is not None)

        status, _ = run_with_fault(config, store, cluster, first_row(store), look_then_cut)
        addresses, up = cluster.network.addresses, cluster.link_is_up(1)
    assert status == "completed", store.error(config.run_id())
    node0, node1 = seen["node0"], seen["node1"]
    assert (addresses[0], RDZV_PORT) in node0
    assert {a for a, _ in node0} == {addresses[0]}, node0
    assert {a for a, _ in node1} <= {addresses[1]}, node1
    assert (addresses[0], RDZV_PORT) in seen["links"], seen["links"]
    assert within == [True, True] and up  # the outage lay within the run, and ended
    done = store.run_dir(config.run_id())
    assert json.loads((done / "status.json").read_text())["resumed"] == []
    assert_same_run(done, uninterrupted)


def test_a_node_whose_launcher_is_killed_fails_the_run_naming_the_node(env: Path) -> None:
    """Nothing restarts a node's launcher: the others wait for it in vain, so even with
    restarts the run fails, naming the node that was lost."""
    config, store = training(max_restarts=1, timeout_seconds=TIMEOUT), Store(env / "store")
    with EmulatedCluster(2, 1) as cluster:
        fault = lambda: cluster.kill_node(1, launcher=True)  # noqa: E731
        status, _ = run_with_fault(config, store, cluster, first_row(store), fault)
        namespace = cluster.network.nodes[1]
    assert status == "failed"
    error = store.error(config.run_id())
    assert error is not None and (error.type, error.rank) == ("NodeLost", 1)
    assert (
        error.message
        == f"node 1 (namespace {namespace}): its launcher was killed by SIGKILL, and ranks 1 with it"
    )


HELD = '''
import os, time
from pathlib import Path
from localsgd import workloads


def make():
    """mnist1d_mlp whose rank 1 writes its pid to the file held at batch 4 and waits there."""
    base = workloads.build("mnist1d_mlp", num_samples=1000)
    original = base.train_batches

    def train_batches(rank, world_size, batch_size, epoch, seed, device):
        for i, data in enumerate(original(rank, world_size, batch_size, epoch, seed, device)):
            if (rank, epoch, i) == (1, 0, 4):
                Path("held").write_text(str(os.getpid()))
                while True:
                    time.sleep(0.05)
            yield data

    base.train_batches = train_batches
    return base
'''


def test_an_asynchronous_run_completes_without_a_lost_node_and_names_its_rank(env: Path) -> None:
    """Node 1's agent stops its workers and gives up when one dies (restarts are refused for
    asynchronous runs); rank 0's server loses the worker and the others train to the end.
    Node 0's launcher waits for the agent that gave up at torch's exit barrier for
    ``train.timeout_seconds``, not torch's 300 s."""
    (env / "held.py").write_text(HELD)
    config = run_config(
        {
            **TRAINING,
            "algorithm": {"name": "async_local_sgd", "period": 2},
            "workload": {"name": "held:make"},
            "train": {"epochs": 1, "eval_every": 5, "timeout_seconds": TIMEOUT},
        }
    )
    store = Store(env / "store")
    with EmulatedCluster(2, 1) as cluster:
        ready = lambda: (env / "held").exists()  # noqa: E731
        status, _ = run_with_fault(config, store, cluster, ready, lambda: cluster.kill_node(1))
    assert status == "completed", store.error(config.run_id())
    done = store.run_dir(config.run_id())
    record = json.loads((done / "status.json").read_text())
    server = record["details"]["server"]
    # Rank 1 pushed twice (steps 2 and 4) before it was held at batch 4; rank 0 trained on.
    assert list(server["lost_workers"]) == ["1"]
    assert server["pushes_per_worker"][1] == 2 and server["pushes_per_worker"][0] > 2
    assert record["steps"] == 22  # rank 0's 22 steps of its epoch: 720 samples, K = 2, B = 16
    version = server["lost_workers"]["1"]
    assert lost_line(store.final_status(config.run_id())) == f"1 worker lost: rank 1 at version {version}"
    node0 = (done / "nodes" / "node0.log").read_text()
    assert node0.count(TORCHRUN_NOTE) == 1
    assert f"wait timeout after {TIMEOUT * 1000}ms" in node0  # torch's exit barrier, bounded by the timeout
