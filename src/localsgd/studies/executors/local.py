"""Runs on this machine: each slot of a study keeps one session per engine (worker pools that
stay up from one run to the next), and ``parallel`` slots never ask for more threads than
the machine has cores unless the caller insists."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

from localsgd import engines
from localsgd.run.config import RunConfig
from localsgd.util.checks import ConfigError

T = TypeVar("T")


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_parallel(
    runs: Sequence[RunConfig], parallel: int, *, cores: int | None = None, oversubscribe: bool = False
) -> None:
    """Refuse ``parallel`` runs at once when they could need more threads than ``cores``
    (parallel x worker processes x threads of the widest run), unless ``oversubscribe``:
    runs that share cores time each other, and their wall times mean nothing."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"--parallel must be an integer >= 1, got {parallel!r}")
    if min(parallel, len(runs)) <= 1 or oversubscribe:
        return
    cores = usable_cores() if cores is None else cores

    def width(run: RunConfig) -> int:
        return run.processes() * run.threads

    widest = max(runs, key=width)
    at_once = min(parallel, len(runs))  # slots beyond the runs stay idle
    need = at_once * width(widest)
    if need > cores:
        fits = cores // width(widest)
        hint = f"use --parallel {fits} or less" if fits >= 2 else "run them one at a time"
        raise ConfigError(
            f"--parallel {parallel} runs up to {at_once} x {widest.processes()} "
            f"worker process(es) x {widest.threads} thread(s) = {need} threads at once (the widest "
            f"run: workers = {widest.workers}, threads = {widest.threads}), and this machine has "
            f"{cores} cores; {hint}, or pass --oversubscribe to share the cores anyway"
        )


class Sessions:
    """One slot's sessions, one per engine, opened on first use."""

    def __init__(self, open_session: Callable[[engines.Engine], engines.Session]) -> None:
        self._open = open_session
        self._sessions: dict[str, engines.Session] = {}
        self._lock = threading.Lock()

    def get(self, engine: str) -> engines.Session:
        with self._lock:
            if engine not in self._sessions:
                self._sessions[engine] = self._open(engines.get(engine))
            return self._sessions[engine]

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()


def run_slots(
    queue: Sequence[T], slots: Sequence[Sessions], work: Callable[[T, Sessions], None]
) -> None:
    """``work`` every item of ``queue``, ``len(slots)`` at a time, each slot on its own
    sessions (closed at the end). The first failure stops the other slots: no new items,
    and the runs in progress are cancelled (left unfinished, redone by the next attempt)."""
    items = iter(queue)
    lock = threading.Lock()
    stop = threading.Event()

    def slot(sessions: Sessions) -> None:
        while not stop.is_set():
            with lock:
                item = next(items, None)
            if item is None:
                return
            work(item, sessions)

    distinct = list({id(s): s for s in slots}.values())
    try:
        if len(slots) == 1:
            slot(slots[0])
            return
        with ThreadPoolExecutor(len(slots), thread_name_prefix="study-slot") as pool:
            futures = [pool.submit(slot, sessions) for sessions in slots]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for future in done:
                    future.result()
            except BaseException:
                stop.set()
                for sessions in distinct:
                    sessions.close()
                raise
    finally:
        stop.set()
        for sessions in distinct:
            sessions.close()
