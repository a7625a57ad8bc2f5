"""An emulated multi-node cluster: N network namespaces × M worker processes each, started
the way a real multi-node job is, one ``torchrun`` per node::

    ip netns exec NODE_i python -m torch.distributed.run --nnodes N --nproc-per-node M \\
        --rdzv-backend c10d --rdzv-endpoint ADDR_0:PORT --local-addr ADDR_i \\
        -m localsgd.worker CONFIG --run-dir DIR

Node 0 hosts the rendezvous; gloo binds to each node's own link (``GLOO_SOCKET_IFNAME``), so
traffic between nodes crosses the shaped links and traffic inside a node its loopback.
:meth:`EmulatedCluster.execute` runs a process engine :class:`~localsgd.engines.Job` this
way, so ``localsgd cluster emulate`` can run a single run or a whole study on it.

Leaving the ``with`` block, for whatever reason (a failed job, an exception, SIGINT,
SIGTERM or SIGHUP), stops every process the cluster started and deletes its namespaces;
further signals are ignored until that is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from localsgd.emulation.network import EmulatedNetwork, NetworkSpec, kill_all, signals_ignored, signals_raise
from localsgd.engines.base import Job, WorkerFailure
from localsgd.engines.launching.launch import root_error, tail
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
        self._procs: list[subprocess.Popen[bytes]] = []
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
        kill_all(self.network.pids())

    # -- launching ---------------------------------------------------------------------------

    def placement(self, nodes: int | None = None, procs_per_node: int | None = None) -> Placement:
        """The first ``nodes`` nodes (default: all) × ``procs_per_node`` (default: M)."""
        n = self.nodes if nodes is None else nodes
        g = self.procs_per_node if procs_per_node is None else procs_per_node
        if not 1 <= n <= self.nodes or g < 1:
            raise ValueError(f"cannot place {n} nodes × {g} processes on {self.nodes} nodes")
        return Placement(tuple(range(n)), g)

    def commands(
        self, program: Sequence[str], where: Placement, run_id: str | None = None
    ) -> list[list[str]]:
        """One ``torchrun ... PROGRAM`` command per node of ``where``, each run inside its
        namespace; ``program`` is what torchrun runs: ``["-m", "localsgd.worker", ...]`` or
        ``["script.py", ...]``."""
        run_id = run_id or secrets.token_hex(4)
        host = self.network.addresses[where.nodes[0]]
        out = []
        for k, node in enumerate(where.nodes):
            out.append(
                [
                    *self.network.exec_prefix(node),
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
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
                    f"is_host={1 if k == 0 else 0}",
                    "--local-addr",
                    self.network.addresses[node],
                    "--max-restarts",
                    "0",
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
            for command, node in zip(self.commands(program, where), where.nodes):
                out = logs.enter_context((log_dir / f"node{node}.log").open("wb"))
                proc = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, env=self.node_env(node, base),
                    start_new_session=True,
                )  # fmt: skip
                self._procs.append(proc)
                procs.append(proc)
            try:
                return self._wait(procs, timeout)
            finally:
                self.stop()

    @staticmethod
    def _wait(procs: list[subprocess.Popen[bytes]], timeout: float | None) -> list[int]:
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
        write_json_atomic(
            job.run_dir / "launch.json",
            {"cluster": self.describe(), "commands": self.commands(args, where, "<rdzv-id>")},
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(job.threads), **job.env)
        log_dir = job.run_dir / "nodes"
        try:
            codes = self.run(args, where=where, env=env, log_dir=log_dir, timeout=job.timeout)
        except TimeoutError as exc:
            raise WorkerFailure(ErrorInfo("TimeoutError", str(exc), _tails(log_dir, where))) from None
        if any(codes):
            error = root_error(job.run_dir) or ErrorInfo(
                "WorkersExited",
                f"nodes exited with codes {codes} without recording an error (see {log_dir})",
                _tails(log_dir, where),
            )
            raise WorkerFailure(error)


def _tails(log_dir: Path, where: Placement) -> str:
    return "\n".join(f"-- node {n}\n{tail(log_dir / f'node{n}.log')}" for n in where.nodes)
