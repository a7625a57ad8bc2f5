"""Heartbeats: which worker stopped answering.

A worker whose process is frozen (stopped with SIGSTOP, deadlocked, swapped out) leaves
its peers waiting in a collective until the process group's timeout, and gloo's timeout
error names no rank. So every worker started by an engine beats: a daemon thread touches
``FOLDER/rank<r>`` (which holds the worker's pid) every :data:`BEAT_SECONDS`, from a thread
of its own, so a worker that waits in a collective still beats; only a process that does
not run at all falls silent. The process that started the workers watches the folder
(:class:`HeartbeatWatch`) and fails the run, naming the rank, when a live worker has been
silent for half of ``train.timeout_seconds`` -- before its peers' collectives time out.

The folder is handed to workers in the environment variable :data:`HEARTBEATS`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from localsgd.records.record import ErrorInfo
from localsgd.util.lifetime import process_alive

HEARTBEATS = "LOCALSGD_HEARTBEATS"
"""The environment variable naming the folder this worker beats into."""
BEAT_SECONDS = 1.0
STARTUP_SECONDS = 60.0
"""What a worker may take beyond the timeout to start beating (Python, torch's import)."""


def silence_limit(timeout: float) -> float:
    """Seconds without a beat after which a live worker counts as stopped: half the run's
    timeout (so the watcher speaks before a collective times out), at least 3 beats."""
    return max(3 * BEAT_SECONDS, timeout / 2)


def start_beating(rank: int, folder: str | Path | None = None) -> bool:
    """Beat as ``rank`` into ``folder`` (default: the :data:`HEARTBEATS` folder) from a
    daemon thread; False when there is no folder to beat into."""
    where = folder if folder is not None else os.environ.get(HEARTBEATS)
    if not where:
        return False
    path = Path(where) / f"rank{rank}"
    try:
        path.write_text(str(os.getpid()))
    except OSError:
        return False

    def beat() -> None:
        while True:
            time.sleep(BEAT_SECONDS)
            try:
                os.utime(path)
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    path.write_text(str(os.getpid()))
            except OSError:
                pass

    threading.Thread(target=beat, name=f"heartbeat-rank{rank}", daemon=True).start()
    return True


class HeartbeatWatch:
    """Watches the beats of ``processes`` workers in ``folder``; see the module docstring.

    A rank that has not beaten yet counts as silent only once ``timeout`` and
    :data:`STARTUP_SECONDS` have passed since the watch began (starting Python and importing
    torch take their time on a busy machine); a rank whose process is dead is not silent
    (its launcher notices the death)."""

    def __init__(self, folder: Path, processes: int, timeout: float) -> None:
        self.folder = Path(folder)
        self.processes = processes
        self.timeout = timeout
        self.silence = silence_limit(timeout)
        self.began = time.time()

    def pids(self) -> dict[int, int]:
        """The pid each rank beat with, by rank (ranks that have not beaten are missing)."""
        found = {}
        for rank in range(self.processes):
            with contextlib.suppress(OSError, ValueError):
                found[rank] = int((self.folder / f"rank{rank}").read_text())
        return found

    def silent(self) -> ErrorInfo | None:
        """The error naming the silent rank(s), or None while every live worker beats."""
        now = time.time()
        quiet: list[tuple[int, int | None, float]] = []
        for rank in range(self.processes):
            path = self.folder / f"rank{rank}"
            try:
                age = now - path.stat().st_mtime
                beating = int(path.read_text())
            except (OSError, ValueError):
                if now - self.began > self.timeout + STARTUP_SECONDS:
                    quiet.append((rank, None, now - self.began))
                continue
            if age > self.silence and process_alive(beating):
                quiet.append((rank, beating, age))
        if not quiet:
            return None
        rank, pid, age = quiet[0]
        who = ", ".join(f"rank {r}" + (f" (pid {p})" if p else "") for r, p, _ in quiet)
        if pid is None:
            what = f"{who} never started answering: no heartbeat within {age:.0f} s of the launch"
        else:
            what = f"{who} stopped answering: no heartbeat for {age:.0f} s"
        return ErrorInfo(
            "WorkerUnresponsive",
            f"{what} (train.timeout_seconds = {self.timeout:g}); the process is stopped (SIGSTOP), "
            "frozen or starved of CPU",
            rank=rank,
        )
