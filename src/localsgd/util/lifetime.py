"""Process lifetime: child processes that die with the process that started them, however
it dies (SIGKILL included).

Two mechanisms, for two kinds of parent:

- :func:`die_with_parent` arms Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``).
  The kernel sends it when the *thread* that forked the child exits, so it suits children
  of a process that forks from its main thread: torch's elastic agent starts its workers
  that way, and each worker arms it for itself.
- :class:`ParentTie` is a pipe whose write end only the parent holds. The child watches
  the read end (:func:`watch_parent`) and reads end-of-file when the parent has exited,
  from whichever thread it was started. A study starts launchers from worker threads, so
  its launchers are tied this way.

Nothing here imports torch: a worker arms its signal before the heavy imports where it can.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

DEFAULT_TIMEOUT_SECONDS = 120.0
"""``train.timeout_seconds`` by default: how long a collective, the rendezvous or a silent
worker may keep a run waiting. A CPU run of this package's workloads never waits that long
between two collectives (an evaluation of ResNet-20 on CIFAR-10 takes well under a minute
on one core); a GPU job with long evaluations or a slow filesystem may need more."""

EXIT_ORPHANED = 3
"""The exit code of a process that left because the process that started it went away."""

LAUNCHER_PID = "LOCALSGD_LAUNCHER_PID"
"""Set by the elastic launcher to its own pid: a worker compares its parent with it, to
notice a launcher that died before the worker armed its parent-death signal."""

WATCH_FD = "LOCALSGD_WATCH_FD"
"""Set by a launch that starts its workers itself (from any thread): the descriptor of the
read end of its :class:`ParentTie`; the worker leaves when it reads end-of-file there."""

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent (the thread that
    forked it) exits. Exits at once (:data:`EXIT_ORPHANED`) when the parent is already gone
    (``LAUNCHER_PID`` names it and is no longer the parent). Returns whether the signal is
    armed (False off Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    expected = os.environ.get(LAUNCHER_PID)
    if armed and expected and expected.isdigit() and os.getppid() != int(expected):
        os._exit(EXIT_ORPHANED)  # the launcher died before the signal was armed
    return armed


_PR_SET_NAME = 15


def name_process(name: str) -> bool:
    """Set this process's name (``/proc/PID/comm``, what ``ps -o comm`` and ``top`` show; at
    most 15 bytes are kept). Returns whether it was set (False off Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ParentTie:
    """The parent's side of a tie: create it, pass :attr:`fd` to the child (``pass_fds``)
    and call :meth:`started` once the child runs. The child sees end-of-file on ``fd`` when
    :meth:`release` is called or this process exits, however it exits."""

    def __init__(self) -> None:
        self.fd, self._write = os.pipe()

    def started(self) -> None:
        """Close this process's copy of the child's end (the child holds its own)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def release(self) -> None:
        """Let the child go: it sees end-of-file as if this process had exited."""
        for fd in (self.fd, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = self._write = -1


def watch_parent(fd: int, on_gone: Callable[[], object]) -> threading.Thread:
    """Call ``on_gone`` (in a daemon thread) when the parent holding the other end of
    ``fd`` exits or releases it."""

    def watch() -> None:
        while True:
            try:
                data = os.read(fd, 1)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                on_gone()
                return

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state follows the command name in parentheses, which may hold spaces.
            state = f.read().rpartition(b")")[2].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


RDZV_ROUND = "LOCALSGD_RDZV_ROUND"
"""The rendezvous round of a worker group, the same on every node, which
:mod:`localsgd.engines.launching.elastic` exports to the workers it starts."""


def restart_attempt() -> int:
    """Which attempt of its group this worker is, 0 outside torch's elastic launcher: the
    rendezvous round that :mod:`~localsgd.engines.launching.elastic` exports (the same on
    every node), else torch's count of this node's restarts."""
    for var in (RDZV_ROUND, "TORCHELASTIC_RESTART_COUNT"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def exit_status(code: int | str | None) -> int:
    """``sys.exit``'s meaning of ``code`` as a process exit status (a message: printed, 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def flush_streams() -> None:
    """Flush standard output and error (whatever they are now)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def flush_output() -> None:
    """Flush the logging handlers and standard output and error."""
    import logging

    logging.shutdown()
    flush_streams()


def exit_process(code: int | str | None = 0) -> NoReturn:
    """End this process with ``code`` (``sys.exit``'s meaning) once its output is flushed,
    skipping the interpreter's teardown. For a distributed worker whose work is done: its
    results written, its process group destroyed (``localsgd.exit_process()`` at the end of
    a script run under torchrun).

    What the teardown adds is a hazard: daemon threads (a heartbeat, torch's own) are
    stopped mid-call with ``pthread_exit`` and C++ static destructors run while other
    threads still use them, which aborts a finished gloo worker ("terminate called without
    an active exception", SIGABRT) in a few launches in a hundred with torch 2.13, and its
    launcher then reports the whole launch failed."""
    status = exit_status(code)
    flush_output()
    os._exit(status)
