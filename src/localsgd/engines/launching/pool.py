"""Worker pools: worker processes that stay up across the runs of a study.

Starting a run's workers costs more than a small run trains: the launcher, P Python
processes importing torch, the rendezvous, loading the data, the teardown. A pool pays it
once. Its P processes (``torchrun --nproc-per-node P -m localsgd.worker --serve ADDRESS``,
or one plain process for a world of one) form one process group, created once, and
connect back to the controller (the study's process) over loopback. The controller hands
them runs one after another -- the run folder, which holds ``config.json`` -- and each
worker trains it through the same trainer as a launched run, keeping each workload it
built for the next run that asks for the same one, and answers with the run's status. A
run's output goes to ``RUN_DIR/workers.log`` as a launched run's does.

A worker that fails records its own exception in the run folder (as a launched worker
does) and exits; the launcher stops the others; the run fails with that root error, and
the next run gets a fresh pool. A worker whose controller goes away (the connection closes
without a stop) exits at once, even in the middle of a run, so that a killed study never
leaves workers writing into a run folder that a rerun has taken over.

Wire format: one JSON object per line. Worker to controller: ``{"hello": rank, "pid":
pid}`` once connected, ``{"done": status}`` after each run. Controller to workers:
``{"run_dir": path}`` per run, ``{"stop": true}`` at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from localsgd.engines.base import Cancelled, Engine, Job, WorkerFailure
from localsgd.engines.launching.heartbeat import HeartbeatWatch
from localsgd.engines.launching.launch import (
    STOP_GRACE,
    WORKER_MODULE,
    Launched,
    root_error,
    tail,
    torchrun_command,
    worker_env,
)
from localsgd.engines.launching.server import Launcher
from localsgd.records.record import ErrorInfo
from localsgd.util.lifetime import DEFAULT_TIMEOUT_SECONDS, EXIT_ORPHANED

__all__ = ["EXIT_ORPHANED", "STOP_GRACE", "LocalSession", "PoolConnection", "WorkerPool", "output_to"]


class Channel:
    """One end of a pool connection: JSON objects, one per line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._pending: list[dict[str, Any]] = []

    def send(self, message: Mapping[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self) -> list[dict[str, Any]]:
        """The messages that arrived with the next read (it blocks until bytes come; some
        may be the start of a message only); ``EOFError`` when the other end closed."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError("the connection closed")
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def receive_one(self) -> dict[str, Any]:
        """The next message (blocking)."""
        while not self._pending:
            self._pending.extend(self.receive())
        return self._pending.pop(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class WorkerPool:
    """``processes`` worker processes serving runs one after another (module docstring).

    Started on its first run. ``threads``: intra-op threads per process (``OMP_NUM_THREADS``);
    ``device``: the runs' device setting, which fixes the backend of the process group;
    ``timeout``: the process group's timeout (``train.timeout_seconds``), also how long a
    worker may stay silent (:mod:`~localsgd.engines.launching.heartbeat`) before its run fails.
    """

    def __init__(
        self,
        processes: int,
        *,
        threads: int = 1,
        device: str = "auto",
        env: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.processes = processes
        self.threads = threads
        self.device = device
        self.env = dict(env or {})
        self.timeout = timeout
        self.runs = 0
        """Runs this pool completed (a pool that served none was started for its run)."""
        self._launched: Launched | None = None
        self._channels: list[Channel] = []
        self._pids: dict[int, int] = {}
        self._folder = Path(tempfile.mkdtemp(prefix="localsgd-pool-"))
        self._beats = self._folder / "heartbeats"
        self._beats.mkdir()
        self.log_path = self._folder / "pool.log"
        """The launcher's and the workers' output outside runs (start-up, rendezvous)."""
        self._busy = False
        self._closed = False

    @property
    def _proc(self) -> Launcher | None:
        return self._launched.proc if self._launched is not None else None

    @property
    def pids(self) -> dict[int, int]:
        """The workers' process ids by rank."""
        return dict(self._pids)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and bool(self._channels)

    def command(self, address: str, watch_fd: int | None = None) -> list[str]:
        program = [
            "-m",
            WORKER_MODULE,
            "--serve",
            address,
            "--device",
            self.device,
            "--timeout",
            f"{self.timeout:g}",
        ]
        if self.processes == 1:
            return [sys.executable, *program]  # a world of one: no launcher, no process group
        return torchrun_command(self.processes, program, timeout=self.timeout, watch_fd=watch_fd)

    def start(self, deadline: float | None = None) -> None:
        """Start the processes and wait until every one has joined the process group and
        connected; ``WorkerFailure`` when the pool exits first or ``deadline``
        (``time.monotonic()``) passes."""
        if self._closed:
            raise Cancelled("the pool is closed")
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(0.2)
            address = f"127.0.0.1:{listener.getsockname()[1]}"
            # A session of its own (a terminal's Ctrl-C reaches the controller alone, which
            # stops the pool in order), tied to this process: a launcher exits with it. A
            # world of one has no launcher; its worker leaves when the connection closes.
            self._launched = launched = Launched(
                lambda fd: self.command(address, fd),
                worker_env(self.threads, self.env, heartbeats=self._beats),
                self.log_path,
                tie=self.processes > 1,
            )
            channels: dict[int, Channel] = {}
            try:
                while len(channels) < self.processes:
                    if self._closed:
                        raise Cancelled("the pool was closed while starting")
                    code = launched.poll()
                    if code is not None:
                        raise WorkerFailure(
                            ErrorInfo(
                                "PoolStartFailed",
                                f"the worker pool exited with code {code} before its workers connected",
                                tail(self.log_path),
                            )
                        )
                    if deadline is not None and time.monotonic() > deadline:
                        raise WorkerFailure(
                            ErrorInfo(
                                "TimeoutError", "the worker pool did not start in time", tail(self.log_path)
                            )
                        )
                    try:
                        sock, _ = listener.accept()
                    except TimeoutError:
                        continue
                    sock.settimeout(None)
                    channel = Channel(sock)
                    try:
                        hello = channel.receive_one()
                    except (EOFError, OSError, ValueError):
                        channel.close()
                        continue  # a worker that died before saying hello: the launcher exits
                    channels[int(hello["hello"])] = channel
                    self._pids[int(hello["hello"])] = int(hello["pid"])
            except BaseException:
                self._channels = list(channels.values())
                self.kill()
                raise
        self._channels = [channels[rank] for rank in range(self.processes)]

    def run(self, job: Job) -> None:
        """Train ``job`` on the pool (started first if need be); ``WorkerFailure`` with the
        root error when a worker failed or ``job.timeout`` passed (the pool is then dead),
        :class:`Cancelled` when the pool was closed meanwhile."""
        deadline = None if job.timeout is None else time.monotonic() + job.timeout
        if not self.alive:
            self.start(deadline)
        self._busy = True
        try:
            self._run(job, deadline)
        except BaseException:
            # Interrupted or failed mid-run: the workers may be inside the run (or stopped),
            # so they are killed rather than asked to stop.
            self.kill(hard=True)
            raise
        finally:
            self._busy = False
        self.runs += 1

    def _run(self, job: Job, deadline: float | None) -> None:
        try:
            for channel in self._channels:
                channel.send({"run_dir": str(job.run_dir)})
        except OSError:
            self._failed(job)
        pending = set(range(self.processes))
        watch = HeartbeatWatch(self._beats, self.processes, self.timeout)
        with selectors.DefaultSelector() as selector:
            for rank, channel in enumerate(self._channels):
                selector.register(channel.sock, selectors.EVENT_READ, rank)
            while pending:
                self._check_alive(job, watch, deadline)
                for key, _ in selector.select(0.2):
                    rank = int(key.data)
                    try:
                        messages = self._channels[rank].receive()
                    except (EOFError, OSError, ValueError):
                        self._failed(job)
                    if any("done" in m for m in messages):
                        pending.discard(rank)
                if pending and self._proc is not None and self._proc.poll() is not None:
                    self._failed(job)

    def _check_alive(self, job: Job, watch: HeartbeatWatch, deadline: float | None) -> None:
        """Raise when the run cannot go on: the pool closed, a worker silent too long, or
        the run's deadline passed (the workers are killed first)."""
        if self._closed:
            raise Cancelled("the pool was closed during a run")
        silent = watch.silent()
        if silent is not None:
            self.kill(hard=True)
            raise WorkerFailure(replace(silent, traceback=tail(job.run_dir / "workers.log")))
        if deadline is not None and time.monotonic() > deadline:
            self.kill(hard=True)
            raise WorkerFailure(
                ErrorInfo(
                    "TimeoutError",
                    f"workers did not finish within {job.timeout} s",
                    tail(job.run_dir / "workers.log"),
                )
            )

    def _failed(self, job: Job) -> NoReturn:
        if self._closed:
            raise Cancelled("the pool was closed during a run")
        code = self._proc.poll() if self._proc is not None else None
        self.kill()
        error = root_error(job.run_dir, self._beats) or ErrorInfo(
            "WorkersExited",
            f"the pool's workers exited (launcher code {code}) without recording an error "
            f"(see {job.run_dir / 'workers.log'})",
            tail(job.run_dir / "workers.log") or tail(self.log_path),
        )
        raise WorkerFailure(error)

    def kill(self, *, hard: bool = False) -> None:
        """Stop the processes now: closed connections make the workers exit (even
        mid-run), the launcher is asked to stop (SIGTERM), then killed; ``hard``: killed at
        once, workers too (a stopped worker answers nothing but SIGKILL)."""
        for channel in self._channels:
            channel.close()
        self._channels = []
        if self._launched is not None:
            self._launched.stop(self._pids.values(), hard=hard)
        self._pids = {}

    def close(self) -> None:
        """Stop the pool: in order when idle (the workers leave the process group), at once
        when a run is in progress (that run is then :class:`Cancelled`). Safe to call from
        another thread."""
        self._closed = True
        proc = self._proc
        if not self._busy and proc is not None and proc.poll() is None:
            try:
                for channel in self._channels:
                    channel.send({"stop": True})
                proc.wait(STOP_GRACE)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
        shutil.rmtree(self._folder, ignore_errors=True)


class LocalSession:
    """Runs on this machine, one after another, each on a pool of its engine's processes
    kept for the next run of the same shape (process count, threads, device); a run of one
    process trains in this process when ``in_process``. At most ``max_processes`` idle
    processes are kept: the pool used longest ago is closed first."""

    def __init__(self, engine: Engine, *, in_process: bool = True, max_processes: int | None = None) -> None:
        self.engine = engine
        self.in_process = in_process
        self.max_processes = max_processes or max(8, 2 * (os.cpu_count() or 1))
        self._pools: OrderedDict[tuple[Any, ...], WorkerPool] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pools(self) -> tuple[WorkerPool, ...]:
        """The pools kept, the most recently used last."""
        with self._lock:
            return tuple(self._pools.values())

    def pool(self, job: Job) -> WorkerPool:
        """The pool ``job`` runs on (made, not started, when there is none of its shape)."""
        processes = self.engine.processes(job.workers, job.engine_options)
        key = (processes, job.threads, job.device, job.comm_timeout, tuple(sorted(job.env.items())))
        with self._lock:
            if self._closed:
                raise Cancelled("the session is closed")
            pool = self._pools.pop(key, None)
            if pool is None or pool._closed:
                while self._pools and sum(p.processes for p in self._pools.values()) + processes > (
                    self.max_processes
                ):
                    _, idle = self._pools.popitem(last=False)
                    idle.close()
                pool = WorkerPool(
                    processes, threads=job.threads, device=job.device, env=job.env, timeout=job.comm_timeout
                )
            self._pools[key] = pool  # the most recently used last
        return pool

    def execute(self, job: Job) -> None:
        if self._closed:
            raise Cancelled("the session is closed")
        if job.max_restarts > 0:
            # torch's elastic launcher restarts the whole group of a failed run, which a
            # pool's workers (and the runs after this one) cannot be part of: a launch of
            # its own, which resumes from the run's last checkpoint after a restart.
            self.engine.execute(job)
            return
        if job.tolerates_lost_workers and self.engine.processes(job.workers, job.engine_options) > 1:
            # A pool is one process group under torch's elastic launcher, which stops every
            # worker when one dies: a launch of its own goes on without a lost worker.
            self.engine.execute(job)
            return
        if self.engine.processes(job.workers, job.engine_options) == 1 and self.in_process:
            job.train(0, 1)
            return
        pool = self.pool(job)
        try:
            pool.run(job)
        except BaseException:
            # A failed or interrupted run leaves its workers dead or mid-run: the next run of
            # this shape gets a fresh pool.
            with self._lock:
                for key, value in list(self._pools.items()):
                    if value is pool:
                        del self._pools[key]
            pool.close()
            raise

    def close(self) -> None:
        """Stop every pool (a run in progress in another thread is :class:`Cancelled`)."""
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()


# -- the worker's end ----------------------------------------------------------------------


class PoolConnection:
    """A pool worker's connection to its controller: the runs it is handed, its answers.

    A reader thread takes the controller's messages as they come, so a controller that goes
    away is noticed at once, in the middle of a run too (the worker then exits)."""

    def __init__(self, address: str, rank: int) -> None:
        host, _, port = address.rpartition(":")
        self.channel = Channel(socket.create_connection((host, int(port))))
        self.channel.send({"hello": rank, "pid": os.getpid()})
        self._messages: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, name="pool-connection", daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(EOFError, OSError, ValueError):
            while True:
                for message in self.channel.receive():
                    self._messages.put(message)
                    if message.get("stop"):
                        return
        # The controller is gone without a stop: leave now, whatever this process is doing,
        # so that nothing more is written into a run folder a rerun may have taken over.
        os._exit(EXIT_ORPHANED)

    def runs(self) -> Iterator[Path]:
        """The run folders handed to this worker, until the controller says stop."""
        while True:
            message = self._messages.get()
            if message.get("stop"):
                return
            yield Path(message["run_dir"])

    def done(self, status: str) -> None:
        self.channel.send({"done": status})

    def close(self) -> None:
        self.channel.close()


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors 1 and 2, so native output too)
    appended to ``path`` for the block, then sent back where they went before."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # the file's disk may be full
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
