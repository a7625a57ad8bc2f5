"""What every way of starting worker processes shares: the launcher command, the workers'
environment, a launch supervised to its end, and the error files through which a worker
reports its own exception.

Launchers run torch's elastic launcher through :mod:`localsgd.engines.launching.elastic`: its stores
listen on loopback alone (and gloo's sockets, through ``GLOO_SOCKET_IFNAME``), it runs in a
session of its own (a terminal's Ctrl-C reaches the controller alone, which stops it in
order), and it exits when the process that started it does, SIGKILL included; its workers
die with it. A worker that fails writes its exception to ``RUN_DIR/errors/rank<r>.json``;
the first one of the latest attempt (torch's elastic launcher may restart the workers) is
the run's root cause, which the caller raises as
:class:`~localsgd.engines.base.WorkerFailure` instead of the launcher's summary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from localsgd.engines.base import Job, WorkerFailure
from localsgd.engines.launching import server
from localsgd.engines.launching.heartbeat import HEARTBEATS, HeartbeatWatch
from localsgd.records.record import ErrorInfo, RecordError, from_json, read_json
from localsgd.util.files import DiskFull, write_json_atomic
from localsgd.util.lifetime import DEFAULT_TIMEOUT_SECONDS, ParentTie, restart_attempt

if TYPE_CHECKING:
    from localsgd.engines.base import Job

log = logging.getLogger(__name__)

ERRORS = "errors"
WORKER_MODULE = "localsgd.worker"
"""The worker entry point every launch path starts (``python -m localsgd.worker``)."""
LAUNCHER_MODULE = server.LAUNCHER_MODULE
"""torch's elastic launcher, bound to one address and tied to its parent (run, not imported)."""
LOOPBACK = "127.0.0.1"
STOP_GRACE = 15.0
"""Seconds a launcher gets to stop its workers before they are killed."""
POLL_SECONDS = 0.2


def torchrun_command(
    processes: int,
    program: Sequence[str],
    *,
    max_restarts: int = 0,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    watch_fd: int | None = None,
    bind: str = LOOPBACK,
) -> list[str]:
    """One machine's launcher: torch's elastic launcher (:mod:`localsgd.engines.launching.elastic`)
    with ``processes`` workers running ``program``, a rendezvous on a free port of ``bind``,
    ``max_restarts`` restarts of the group, ``timeout`` seconds for the rendezvous, and
    (``watch_fd``) tied to this process."""
    tie = ["--watch-fd", str(watch_fd)] if watch_fd is not None else []
    return [
        sys.executable,
        "-m",
        LAUNCHER_MODULE,
        "--bind",
        bind,
        *tie,
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(processes),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{bind}:0",
        "--rdzv-id",
        uuid.uuid4().hex,
        "--rdzv-conf",
        f"join_timeout={max(1, math.ceil(timeout))}",
        "--local-addr",
        bind,
        "--max-restarts",
        str(max_restarts),
        *program,
    ]


def loopback_interface() -> str:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS)."""
    with contextlib.suppress(OSError, AttributeError):
        names = [name for _, name in socket.if_nameindex()]
        for name in ("lo", "lo0"):
            if name in names:
                return name
    return "lo"


def worker_env(
    threads: int, extra: Mapping[str, str] | None = None, *, heartbeats: Path | None = None
) -> dict[str, str]:
    """This process's environment for workers on this machine: ``threads`` intra-op
    threads, gloo's and NCCL's sockets on the loopback interface, the heartbeat folder,
    and the current directory on the import path (an import-path workload there must
    import in the workers as it does here)."""
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    loopback = loopback_interface()
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=path,
        GLOO_SOCKET_IFNAME=loopback,
        NCCL_SOCKET_IFNAME=loopback,
    )
    if heartbeats is not None:
        env[HEARTBEATS] = str(heartbeats)
    env.update(extra or {})
    return env


class Launched:
    """A launcher process started by this one, in a session of its own and (``tie``) tied
    to this process; ``command(fd)`` builds its command line from the tie's descriptor."""

    def __init__(
        self,
        command: Callable[[int | None], list[str]],
        env: Mapping[str, str],
        log_path: Path,
        *,
        tie: bool = True,
        append: bool = True,
    ) -> None:
        self._tie = ParentTie() if tie else None
        fd = self._tie.fd if self._tie is not None else None
        self.command = command(fd)
        with log_path.open("ab" if append else "wb") as log:
            served = (
                server.start(self.command, env=env, stdout=log.fileno(), tie=fd)
                if server.wanted(self.command, env)
                else None
            )
            self.proc: server.Launcher = served or subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
                pass_fds=() if fd is None else (fd,),
            )
        if self._tie is not None:
            self._tie.started()

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None and self._tie is not None:
            self._tie.release()
        return code

    def stop(self, pids: Iterable[int] = (), *, hard: bool = False) -> None:
        """Stop the launcher and its workers: ask it (SIGTERM: it stops its workers) and
        wait :data:`STOP_GRACE` seconds, then kill it and ``pids``; ``hard``: kill at once
        (a stopped worker never answers a SIGTERM)."""
        pids = list(pids)
        if self.proc.poll() is None and not hard:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_GRACE)
        if self.proc.poll() is None or hard:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self._tie is not None:
            self._tie.release()


def launch_run(job: Job, processes: int) -> None:
    """Run ``job`` on ``processes`` worker processes of its own under torch's elastic
    launcher (``job.max_restarts`` restarts of the group) and wait for the end; raise
    :class:`WorkerFailure` with the root error when it fails, ``job.timeout`` passes or a
    worker stops answering (:class:`~localsgd.engines.launching.heartbeat.HeartbeatWatch`). An
    interruption (KeyboardInterrupt) stops the workers before it propagates.

    A job whose workers may be lost (``job.tolerates_lost_workers``) is for
    :func:`~localsgd.engines.launching.tolerant.launch_tolerant` instead: torch's elastic
    launcher stops the group when one worker dies."""
    folder = job.run_dir
    program = ["-m", WORKER_MODULE, str(folder / "config.json"), "--run-dir", str(folder)]
    log_path = folder / "workers.log"
    beats = Path(tempfile.mkdtemp(prefix="localsgd-beats-"))
    try:
        launched = Launched(
            lambda fd: torchrun_command(
                processes, program, max_restarts=job.max_restarts, timeout=job.comm_timeout, watch_fd=fd
            ),
            worker_env(job.threads, job.env, heartbeats=beats),
            log_path,
            append=False,
        )
        watch = HeartbeatWatch(beats, processes, job.comm_timeout)
        deadline = None if job.timeout is None else time.monotonic() + job.timeout
        try:
            # Inside: a full disk here stops the launcher it has just started.
            write_json_atomic(folder / "launch.json", {"command": launched.command})
            while (code := launched.poll()) is None:
                problem = watch.silent()
                if problem is None and deadline is not None and time.monotonic() > deadline:
                    problem = ErrorInfo("TimeoutError", f"workers did not finish within {job.timeout} s")
                if problem is not None:
                    launched.stop(watch.pids().values(), hard=True)
                    raise WorkerFailure(_with_log(problem, log_path))
                time.sleep(POLL_SECONDS)
        except BaseException:
            launched.stop(watch.pids().values())
            raise
        if code != 0 and not exited_after_completion(folder, log_path):
            error = root_error(folder, beats) or ErrorInfo(
                "WorkersExited",
                f"workers exited with code {code} without recording an error (see {log_path})",
                tail(log_path),
            )
            raise WorkerFailure(error)
    finally:
        shutil.rmtree(beats, ignore_errors=True)


ENDED_STATUSES = ("completed", "diverged")
_EXIT_LINE = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")


def exit_signals(log_path: Path) -> dict[int, int]:
    """The exit codes torch's elastic launcher logged for the workers that failed, by local
    rank (a negative code: killed by that signal)."""
    if not log_path.exists():
        return {}
    text = log_path.read_text(errors="replace")
    return {int(rank): int(code) for code, rank in _EXIT_LINE.findall(text)}


def exited_after_completion(folder: Path, log_path: Path) -> bool:
    """Whether a launch the launcher calls failed is a finished run that a worker's exit
    spoiled: rank 0 wrote a completed (or diverged) ``status.json``, no worker recorded an
    error, and every failure the launcher logged is a signal. The run's record is whole,
    so it is reported as it ended; a warning names the rank and the signal."""
    try:
        status = read_json(folder / "status.json").get("status")
    except (RecordError, OSError, AttributeError):
        return False
    codes = exit_signals(log_path)
    if status not in ENDED_STATUSES or root_error(folder) is not None or not codes:
        return False
    if any(code >= 0 for code in codes.values()):
        return False
    for rank, code in sorted(codes.items()):
        log.warning(
            "run %s %s, but rank %d then exited with %s; the run is reported %s",
            folder.name,
            status,
            rank,
            _signal_name(-code),
            status,
        )
    return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _with_log(error: ErrorInfo, log_path: Path) -> ErrorInfo:
    from dataclasses import replace

    return replace(error, traceback=error.traceback or tail(log_path))


def write_worker_error(run_dir: str | Path, rank: int, exc: BaseException) -> None:
    """Record worker ``rank``'s exception in the run folder (every rank may do this). When
    the run folder cannot take it (its disk is full), it goes to the heartbeat folder of
    the launch (on the temporary filesystem), which :func:`root_error` reads too."""
    info = ErrorInfo.from_exception(exc, rank)
    data = {"time": time.time(), "attempt": restart_attempt(), **info.__dict__}
    folder = Path(run_dir) / ERRORS
    try:
        folder.mkdir(exist_ok=True)
        write_json_atomic(folder / f"rank{rank}.json", data)
    except (OSError, DiskFull):
        spare = os.environ.get(HEARTBEATS)
        if not spare:
            raise
        data["run_dir"] = str(Path(run_dir).resolve())
        write_json_atomic(Path(spare) / f"error-rank{rank}.json", data)


def root_error(run_dir: Path, spare: Path | None = None) -> ErrorInfo | None:
    """The first error a worker recorded (by time) in the latest attempt, or None; in the
    run folder, or (``spare``: the launch's heartbeat folder) there, for this run."""
    paths = sorted((run_dir / ERRORS).glob("rank*.json"))
    if spare is not None:
        paths += sorted(Path(spare).glob("error-rank*.json"))
    found: list[tuple[int, float, ErrorInfo]] = []
    for path in paths:
        try:
            data = read_json(path)
            when = float(data.pop("time"))
            attempt = int(data.pop("attempt", 0))
            where = data.pop("run_dir", None)
            if where is not None and Path(where) != Path(run_dir).resolve():
                continue
            found.append((-attempt, when, from_json(ErrorInfo, data, str(path), versioned=False)))
        except (RecordError, KeyError, TypeError, ValueError, AttributeError):
            continue
    return min(found, key=lambda f: (f[0], f[1]))[2] if found else None


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
