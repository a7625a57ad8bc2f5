"""An emulated multi-node cluster: N network namespaces × M worker processes each, started
the way a real multi-node job is, one ``torchrun`` per node::

    ip netns exec NODE_i python -m localsgd.engines.launching.elastic --bind ADDR_i \\
        --nnodes N --nproc-per-node M --rdzv-backend c10d --rdzv-endpoint ADDR_0:PORT \\
        --local-addr ADDR_i --max-restarts R -m localsgd.worker CONFIG --run-dir DIR

(torchrun, its stores bound to the node's own address). Node 0 hosts the rendezvous; gloo
binds to each node's own link (``GLOO_SOCKET_IFNAME``), so traffic between nodes crosses the shaped links and traffic inside a node its loopback.
:meth:`EmulatedCluster.execute` runs a process engine :class:`~localsgd.engines.Job` this
way, so ``localsgd cluster emulate`` can run a single run or a whole study on it.
:meth:`EmulatedCluster.kill_node`, :meth:`~EmulatedCluster.link_down` and
:meth:`~EmulatedCluster.link_up` inject the faults of whole nodes and links while a job runs.

Leaving the ``with`` block, for whatever reason (a failed job, an exception, SIGINT,
SIGTERM or SIGHUP), stops every process the cluster started and deletes its namespaces;
further signals are ignored until that is done.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from localsgd.emulation.network import (
    EmulatedNetwork,
    EmulationError,
    NetworkSpec,
    kill_all,
    namespace_pids,
    signals_ignored,
    signals_raise,
)
from localsgd.engines.base import Job, WorkerFailure
from localsgd.engines.launching import server
from localsgd.engines.launching.launch import LAUNCHER_MODULE, exit_signals, root_error, tail
from localsgd.engines.launching.server import Launcher
from localsgd.records.record import ErrorInfo
from localsgd.util.files import write_json_atomic

log = logging.getLogger(__name__)

RDZV_PORT = 29400
"""The rendezvous port on node 0 (inside node 0's namespace: it cannot clash with the
machine's own ports)."""
FAILURE_GRACE = 10.0
"""Seconds the other nodes get to exit after one node's job failed before they are stopped
(their workers may be blocked in a collective with the dead ones until gloo's timeout)."""


@dataclass(frozen=True)
class Placement:
    """Which nodes of the cluster a launch uses and how many processes each starts."""

    nodes: tuple[int, ...]
    procs_per_node: int

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.procs_per_node


class EmulatedCluster:
    """``nodes`` emulated nodes of ``procs_per_node`` worker processes (M), their links
    shaped to ``rate`` with a ``burst``-byte bucket (see
    :class:`~localsgd.emulation.network.NetworkSpec`).

    A context manager: entering builds the network, leaving stops every process it started
    and deletes the network, whatever ended the block.
    """

    def __init__(
        self,
        nodes: int,
        procs_per_node: int,
        rate: str | None = None,
        burst: int | None = None,
    ) -> None:
        if isinstance(procs_per_node, bool) or not isinstance(procs_per_node, int) or procs_per_node < 1:
            raise ValueError(f"procs_per_node must be an integer >= 1, got {procs_per_node!r}")
        self.spec = NetworkSpec(nodes, rate, burst)
        self.procs_per_node = procs_per_node
        self.network = EmulatedNetwork(self.spec)
        self._procs: list[Launcher] = []
        self._launchers: dict[int, Launcher] = {}
        self._signals: contextlib.ExitStack | None = None

    @property
    def nodes(self) -> int:
        return self.spec.nodes

    @property
    def world_size(self) -> int:
        """K: the worker processes a job on the whole cluster runs."""
        return self.nodes * self.procs_per_node

    def describe(self) -> str:
        return f"{self.nodes} nodes × {self.procs_per_node} processes; {self.spec.describe()}"

    # -- lifetime ----------------------------------------------------------------------------

    def __enter__(self) -> EmulatedCluster:
        stack = contextlib.ExitStack()
        stack.enter_context(signals_raise())
        self._signals = stack
        try:
            self.network.up()
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            with signals_ignored():
                self.stop()
                self.network.down()
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None

    def stop(self) -> None:
        """Stop every launcher this cluster started and everything left in its nodes."""
        kill_all([p.pid for p in self._procs if p.poll() is None])
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs = []
        self._launchers = {}
        kill_all(self.network.pids())

    # -- faults --------------------------------------------------------------------------------

    def kill_node(self, node: int, *, launcher: bool = False) -> list[int]:
        """SIGKILL every worker process running in node ``node`` (a machine whose workers
        crashed at once); ``launcher``: its torchrun agent too (the whole node lost). Returns
        the pids killed. With ``max_restarts`` the agent of a node whose workers died
        restarts the group on every node; a node whose agent died cannot rejoin (nothing
        restarts it), and the run fails naming the node."""
        agent = self._launchers.get(node)
        if agent is None or agent.poll() is not None:
            raise RuntimeError(f"node {node} runs no launcher of this cluster")
        victims = [pid for pid in namespace_pids(self.network.nodes[node]) if pid != agent.pid]
        if launcher:
            victims.append(agent.pid)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.info("node %d: killed %s", node, victims)
        return victims

    def link_down(self, node: int) -> None:
        """Take node ``node``'s link down (its end of the veth pair): nothing reaches the
        node or leaves it, its processes stay alive and its address stays configured."""
        self._link(node, "down")

    def link_up(self, node: int) -> None:
        """Bring node ``node``'s link back up (the kernel restores its route)."""
        self._link(node, "up")

    def link_is_up(self, node: int) -> bool:
        """Whether node ``node``'s link is administratively up."""
        out = _ip(["-n", self.network.nodes[node], "-o", "link", "show", self.network.interfaces[node]])
        flags = out.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in out else []
        return "UP" in flags

    def _link_known_up(self, node: int) -> bool:
        # A link whose state cannot be read is not blamed: the workers' own errors speak.
        try:
            return self.link_is_up(node)
        except EmulationError:
            return True

    @contextlib.contextmanager
    def link_outage(self, node: int) -> Iterator[None]:
        """Node ``node``'s link is down within the block and up again after it, whatever
        ended the block."""
        self.link_down(node)
        try:
            yield
        finally:
            self.link_up(node)

    def _link(self, node: int, state: str) -> None:
        if not 0 <= node < self.nodes:
            raise ValueError(f"node must be in [0, {self.nodes - 1}], got {node}")
        _ip(["-n", self.network.nodes[node], "link", "set", self.network.interfaces[node], state])
        log.info("node %d: link %s %s", node, self.network.interfaces[node], state)

    # -- launching ---------------------------------------------------------------------------

    def placement(self, nodes: int | None = None, procs_per_node: int | None = None) -> Placement:
        """The first ``nodes`` nodes (default: all) × ``procs_per_node`` (default: M)."""
        n = self.nodes if nodes is None else nodes
        g = self.procs_per_node if procs_per_node is None else procs_per_node
        if not 1 <= n <= self.nodes or g < 1:
            raise ValueError(f"cannot place {n} nodes × {g} processes on {self.nodes} nodes")
        return Placement(tuple(range(n)), g)

    def commands(
        self,
        program: Sequence[str],
        where: Placement,
        run_id: str | None = None,
        *,
        max_restarts: int = 0,
        join_timeout: float | None = None,
    ) -> list[list[str]]:
        """One ``torchrun ... PROGRAM`` command per node of ``where``, each run inside its
        namespace; ``program`` is what torchrun runs: ``["-m", "localsgd.worker", ...]`` or
        ``["script.py", ...]``. Each node's launcher
        (:mod:`~localsgd.engines.launching.elastic`) binds its stores to the node's own
        address: node 0's rendezvous store listens on ``ADDR_0:RDZV_PORT`` alone.
        ``max_restarts``: restarts of the whole group across nodes after a worker fails;
        ``join_timeout``: seconds the nodes wait for one another at each rendezvous, and
        at the end (torch's exit barrier, which a failed node's agent never reaches)."""
        run_id = run_id or secrets.token_hex(4)
        host = self.network.addresses[where.nodes[0]]
        conf = "" if join_timeout is None else f",join_timeout={max(1, math.ceil(join_timeout))}"
        out = []
        for k, node in enumerate(where.nodes):
            out.append(
                [
                    *self.network.exec_prefix(node),
                    sys.executable,
                    "-m",
                    LAUNCHER_MODULE,
                    "--bind",
                    self.network.addresses[node],
                    *([] if join_timeout is None else ["--exit-barrier", str(max(1, math.ceil(join_timeout)))]),
                    "--nnodes",
                    str(len(where.nodes)),
                    "--nproc-per-node",
                    str(where.procs_per_node),
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    f"{host}:{RDZV_PORT}",
                    "--rdzv-id",
                    run_id,
                    # Node 0 hosts the rendezvous store; said explicitly, since every node
                    # shares the machine's hostname.
                    "--rdzv-conf",
                    f"is_host={1 if k == 0 else 0}{conf}",
                    "--local-addr",
                    self.network.addresses[node],
                    "--max-restarts",
                    str(max_restarts),
                    *program,
                ]
            )
        return out

    def node_env(self, node: int, base: Mapping[str, str]) -> dict[str, str]:
        """The environment of node ``node``'s launcher: gloo bound to the node's link."""
        env = dict(base)
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
            env.pop(var, None)  # an outer launcher's variables must not leak into the nodes
        env["GLOO_SOCKET_IFNAME"] = self.network.interfaces[node]
        return env

    def run(
        self,
        program: Sequence[str],
        *,
        where: Placement | None = None,
        env: Mapping[str, str] | None = None,
        log_dir: Path,
        timeout: float | None = None,
        max_restarts: int = 0,
        join_timeout: float | None = None,
    ) -> list[int]:
        """Run ``program`` (:meth:`commands`) under torchrun on the nodes of ``where``
        (default: all × M) and wait; returns each node's exit code. Logs go to
        ``log_dir/node<i>.log``. A node that fails gets the others stopped after
        :data:`FAILURE_GRACE` seconds; past ``timeout`` every node is stopped (``TimeoutError``)."""
        if self._signals is None:
            raise RuntimeError("the emulated cluster is not up: use it as a context manager")
        where = where or self.placement()
        base = dict(os.environ if env is None else env)
        # Workers import what this process can: an import-path workload in the current directory.
        base["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), base.get("PYTHONPATH", "")) if p)
        log_dir.mkdir(parents=True, exist_ok=True)
        procs = []
        with contextlib.ExitStack() as logs:
            commands = self.commands(program, where, max_restarts=max_restarts, join_timeout=join_timeout)
            for command, node in zip(commands, where.nodes):
                out = logs.enter_context((log_dir / f"node{node}.log").open("wb"))
                proc = self._start(command, node, self.node_env(node, base), out)
                self._procs.append(proc)
                self._launchers[node] = proc
                procs.append(proc)
            try:
                return self._wait(procs, timeout)
            finally:
                self.stop()

    def _start(self, command: list[str], node: int, env: dict[str, str], out: BinaryIO) -> Launcher:
        """Node ``node``'s launcher: forked from this process's launcher server into the
        node's network namespace (:mod:`~localsgd.engines.launching.server`), else started
        with ``ip netns exec``; in a session of its own either way."""
        prefix = self.network.exec_prefix(node)
        program = command[len(prefix) :]
        if server.wanted(program, env):
            netns = self.network.namespace_path(node)
            served = server.start(program, env=env, stdout=out.fileno(), tie=None, netns=netns)
            if served is not None:
                return served
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @staticmethod
    def _wait(procs: list[Launcher], timeout: float | None) -> list[int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        failed_at: float | None = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if failed_at is not None and now - failed_at > FAILURE_GRACE:
                break  # the caller stops the rest
            if deadline is not None and now > deadline:
                raise TimeoutError(f"the emulated job did not finish within {timeout} s")
            time.sleep(0.1)
        return [p.returncode if p.returncode is not None else -9 for p in procs]

    def execute(self, job: Job) -> None:
        """Run a process engine ``job`` (one run: ``localsgd.worker`` on its
        ``config.json``) on all N × M workers; ``WorkerFailure`` with the first worker's
        own error when it fails."""
        if job.workers != self.world_size:
            raise ValueError(
                f"the run has workers = {job.workers}; the emulated cluster runs {self.world_size} "
                f"({self.nodes} nodes × {self.procs_per_node} processes)"
            )
        args = ["-m", "localsgd.worker", str(job.run_dir / "config.json"), "--run-dir", str(job.run_dir)]
        where = self.placement()
        restarts, join = job.max_restarts, job.comm_timeout
        commands = self.commands(args, where, "<rdzv-id>", max_restarts=restarts, join_timeout=join)
        write_json_atomic(job.run_dir / "launch.json", {"cluster": self.describe(), "commands": commands})
        env = dict(os.environ, OMP_NUM_THREADS=str(job.threads), **job.env)
        log_dir = job.run_dir / "nodes"
        try:
            codes = self.run(
                args,
                where=where,
                env=env,
                log_dir=log_dir,
                timeout=job.timeout,
                max_restarts=restarts,
                join_timeout=join,
            )
        except TimeoutError as exc:
            error = self.node_fault(log_dir, where, {})
            message = str(exc) if error is None else f"{exc}: {error.message}"
            rank = None if error is None else error.rank
            raise WorkerFailure(ErrorInfo("TimeoutError", message, _tails(log_dir, where), rank)) from None
        if any(codes):
            error = (
                self.node_fault(log_dir, where, dict(zip(where.nodes, codes)))
                or root_error(job.run_dir)
                or ErrorInfo(
                    "WorkersExited",
                    f"nodes exited with codes {codes} without recording an error (see {log_dir})",
                    _tails(log_dir, where),
                )
            )
            raise WorkerFailure(error)

    def node_fault(self, log_dir: Path, where: Placement, codes: Mapping[int, int]) -> ErrorInfo | None:
        """What a failed job's nodes say went wrong with a whole node, before the errors its
        workers recorded (a peer's lost connection names the survivor, not the node at
        fault): a node whose link is down (``NodeUnreachable``), a node whose launcher was
        killed by a signal (``NodeLost``), or workers killed by a signal (``WorkerKilled``),
        each naming the node, its namespace and the ranks. ``codes``: the launchers' exit
        codes by node. None when no node is at fault."""
        first: ErrorInfo | None = None
        for node in where.nodes:
            where_text = f"node {node} (namespace {self.network.nodes[node]})"
            ranks = _node_ranks(log_dir / f"node{node}.log", node, where)
            if not self._link_known_up(node):
                return ErrorInfo(
                    "NodeUnreachable",
                    f"{where_text} is unreachable: its link {self.network.interfaces[node]} is down "
                    f"(ranks {_list(ranks)} ran there)",
                    _tails(log_dir, where),
                    ranks[0],
                )
            code = codes.get(node)
            if code is not None and code < 0 and first is None:
                first = ErrorInfo(
                    "NodeLost",
                    f"{where_text}: its launcher was killed by {_signal_name(-code)}, and ranks "
                    f"{_list(ranks)} with it",
                    _tails(log_dir, where),
                    ranks[0],
                )
            killed = {
                local: code
                for local, code in exit_signals(log_dir / f"node{node}.log").items()
                if code < 0 and -code not in _STOP_SIGNALS
            }
            if killed and first is None:
                local, sig = min(killed.items())
                rank = ranks[local] if local < len(ranks) else None
                first = ErrorInfo(
                    "WorkerKilled",
                    f"{where_text}: rank {rank} (local rank {local}) was killed by {_signal_name(-sig)}",
                    _tails(log_dir, where),
                    rank,
                )
        return first


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals with which launchers stop their workers: a worker ended by one was not the fault."""
_ROUND_LINE = re.compile(r"localsgd: rendezvous round \d+: this node is group rank (\d+) of \d+")
"""ROUND_LINE, as the launcher prints it."""


def _node_ranks(log_path: Path, node: int, where: Placement) -> list[int]:
    """The global ranks node ``node``'s workers had in their latest group: from the group
    rank its launcher printed (:data:`~localsgd.engines.launching.elastic.ROUND_LINE`), else
    by placement (the rendezvous orders the nodes as it likes)."""
    k = where.nodes.index(node)
    with contextlib.suppress(OSError):
        found = _ROUND_LINE.findall(log_path.read_text(errors="replace"))
        if found:
            k = int(found[-1])
    return list(range(k * where.procs_per_node, (k + 1) * where.procs_per_node))


def _list(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ip(args: Sequence[str]) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise EmulationError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _tails(log_dir: Path, where: Placement) -> str:
    return "\n".join(f"-- node {n}\n{tail(log_dir / f'node{n}.log')}" for n in where.nodes)
