"""A launch that outlives its workers: one process per rank, started here, for runs whose
workers may be lost (an asynchronous algorithm's, which declares it).

torch's elastic launcher treats any worker's death as the group's: it stops the others and
the run fails, although a parameter server (rank 0) goes on without a lost worker. This
launch starts the ranks itself, each with the environment torchrun would give it (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR`` on
loopback, ``MASTER_PORT``): rank 0 hosts the process group's store, bound to loopback (see
:func:`localsgd.distributed.init_distributed`). Then:

- a rank k > 0 that dies (a signal, a non-zero exit) is *lost*: the others go on, and once
  the run has ended its ``status.json`` lists the rank and how its process ended
  (``details.lost_ranks``) beside the version at which the server lost it;
- rank 0's death (it hosts the server) fails the run, naming rank 0; the others are stopped;
- heartbeats, ``train.timeout_seconds`` and the run's deadline work as under
  :func:`~localsgd.engines.launching.launch.launch_run`.

Each worker runs in a session of its own (a terminal's Ctrl-C reaches the controller alone)
and is tied to this process by a pipe (:class:`~localsgd.util.lifetime.ParentTie`, its end
named in :data:`~localsgd.util.lifetime.WATCH_FD`): when this process exits, however it
exits, the workers leave at once. ``RUN_DIR/launch.json`` holds the command and each
rank's pid.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from localsgd.engines.base import Job, WorkerFailure
from localsgd.engines.launching.heartbeat import HeartbeatWatch
from localsgd.engines.launching.launch import (
    ERRORS,
    LOOPBACK,
    POLL_SECONDS,
    STOP_GRACE,
    WORKER_MODULE,
    tail,
    worker_env,
)
from localsgd.records.record import ErrorInfo, RecordError, from_json, read_json
from localsgd.util.files import write_json_atomic
from localsgd.util.lifetime import LAUNCHER_PID, WATCH_FD, ParentTie

log = logging.getLogger(__name__)

SERVER_RANK = 0
"""The rank that hosts the parameter server: the run cannot go on without it."""
TORCHRUN_ONLY = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT")
"""What torch's elastic agent sets that these workers must not inherit (they have no agent)."""


def ended(code: int) -> str:
    """How a process ended, in words: ``SIGKILL``, ``exit code 1``."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def launch_tolerant(job: Job, processes: int) -> dict[int, str]:
    """Run ``job`` on ``processes`` worker processes started here (module docstring) and
    wait for the end. Returns the ranks lost on the way (how each ended); raises
    :class:`WorkerFailure` when rank 0 fails or dies, a worker stops answering or
    ``job.timeout`` passes. An interruption stops the workers before it propagates."""
    folder = job.run_dir
    command = [sys.executable, "-m", WORKER_MODULE, str(folder / "config.json"), "--run-dir", str(folder)]
    log_path = folder / "workers.log"
    beats = Path(tempfile.mkdtemp(prefix="localsgd-beats-"))
    base = worker_env(job.threads, job.env, heartbeats=beats)
    for name in TORCHRUN_ONLY:
        base.pop(name, None)
    tie = ParentTie()
    base.update(
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(_free_port(LOOPBACK)),
        WORLD_SIZE=str(processes),
        LOCAL_WORLD_SIZE=str(processes),
        GROUP_RANK="0",
        ROLE_WORLD_SIZE=str(processes),
        **{WATCH_FD: str(tie.fd)},
    )
    base.pop(LAUNCHER_PID, None)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    lost: dict[int, str] = {}
    try:
        with log_path.open("wb") as out:
            for rank in range(processes):
                env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank)}
                procs[rank] = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    pass_fds=(tie.fd,),
                )
        tie.started()
        write_json_atomic(
            folder / "launch.json",
            {"command": command, "launcher": "tolerant", "pids": {str(r): p.pid for r, p in procs.items()}},
        )
        _supervise(job, procs, HeartbeatWatch(beats, processes, job.comm_timeout), lost, log_path)
    except BaseException:
        _stop(procs.values())
        raise
    finally:
        tie.release()
        shutil.rmtree(beats, ignore_errors=True)
    if lost:
        _note_lost(folder, lost)
    return lost


def _supervise(
    job: Job,
    procs: dict[int, subprocess.Popen[bytes]],
    watch: HeartbeatWatch,
    lost: dict[int, str],
    log_path: Path,
) -> None:
    """Wait until every worker has ended, recording the ranks > 0 that died in ``lost``."""
    deadline = None if job.timeout is None else time.monotonic() + job.timeout
    running = set(procs)
    while running:
        for rank in sorted(running):
            code = procs[rank].poll()
            if code is None:
                continue
            running.discard(rank)
            if code == 0:
                continue
            if rank == SERVER_RANK:
                _stop(procs[r] for r in running)
                raise WorkerFailure(_server_error(job.run_dir, code, log_path))
            lost[rank] = ended(code)
            log.warning(
                "run %s: rank %d was lost (%s); the others go on without it",
                job.run_dir.name.removesuffix(".partial"),
                rank,
                lost[rank],
            )
        if not running:
            return
        problem = watch.silent()
        if problem is None and deadline is not None and time.monotonic() > deadline:
            problem = ErrorInfo("TimeoutError", f"workers did not finish within {job.timeout} s")
        if problem is not None:
            _stop((procs[r] for r in running), hard=True)
            raise WorkerFailure(replace(problem, traceback=problem.traceback or tail(log_path)))
        time.sleep(POLL_SECONDS)


def _server_error(folder: Path, code: int, log_path: Path) -> ErrorInfo:
    """Why the run failed when rank 0 ended badly: its own recorded exception, or else its
    death (the other ranks' errors follow from it: their server went away)."""
    path = folder / ERRORS / f"rank{SERVER_RANK}.json"
    with contextlib.suppress(RecordError, OSError, KeyError, TypeError, ValueError, AttributeError):
        data = read_json(path)
        data.pop("time", None)
        data.pop("attempt", None)
        return from_json(ErrorInfo, data, str(path), versioned=False)
    return ErrorInfo(
        "ServerLost",
        f"rank {SERVER_RANK}, which hosts the parameter server, ended with {ended(code)} without recording "
        f"an error; the run cannot go on without it (see {log_path})",
        tail(log_path),
        rank=SERVER_RANK,
    )


def _stop(procs: Iterable[subprocess.Popen[bytes]], *, hard: bool = False) -> None:
    """Stop these workers: SIGTERM and :data:`STOP_GRACE` seconds, then SIGKILL (``hard``: at once)."""
    alive = [p for p in procs if p.poll() is None]
    if not hard:
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, end - time.monotonic()))
    for p in alive:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        p.wait()


def _note_lost(folder: Path, lost: dict[int, str]) -> None:
    """Add the lost ranks to the run's ``status.json`` (``details.lost_ranks``), if rank 0
    wrote one. A rank the server did not lose had finished its part (its exit spoiled
    nothing of the record, as in :func:`~localsgd.engines.launching.launch.exited_after_completion`):
    a warning, not a loss."""
    path = folder / "status.json"
    try:
        status = read_json(path)
    except (RecordError, OSError):
        return
    details = status.get("details") if isinstance(status, dict) else None
    if not isinstance(details, dict):
        return
    server = details.get("server")
    seen = server.get("lost_workers") if isinstance(server, dict) else None
    if isinstance(seen, dict):
        for rank in [r for r in lost if str(r) not in seen]:
            log.warning(
                "run %s: rank %d had finished its part, then exited with %s",
                folder.name.removesuffix(".partial"),
                rank,
                lost.pop(rank),
            )
    if lost:
        details["lost_ranks"] = {str(rank): how for rank, how in sorted(lost.items())}
        write_json_atomic(path, status)
