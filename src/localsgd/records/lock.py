"""Who may write a store: advisory locks on files inside it (``flock``).

A study holds its store's lock exclusively for as long as it runs; a single run
(``localsgd train``, a hand-run torchrun) holds it shared, plus its own run's lock
exclusively, so several single runs may record into one store at once but never the same
run twice, and never beside a study. Readers (``localsgd report``) take no lock. The lock
file holds the pid, host and command of its latest holder, for the message a refused
process prints. A lock dies with its process, however the process ends.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

from localsgd.util.checks import ConfigError

try:
    import fcntl
except ImportError:  # not on a POSIX system: no locking
    fcntl = None  # type: ignore[assignment]


class StoreInUse(ConfigError):
    """Another process holds the lock (a usage error: exit code 2)."""


class FileLock:
    """An ``flock`` on ``path`` (created if need be), exclusive or ``shared``; ``what``
    names the locked thing in the refusal ("store DIR", "run ID in store DIR")."""

    def __init__(self, path: Path, what: str, *, shared: bool = False) -> None:
        self.path = Path(path)
        self.what = what
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        """Take the lock now or raise :class:`StoreInUse` naming the holder's pid."""
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StoreInUse(
                f"{self.what} is in use by {holder}; wait for it to finish or stop it"
            ) from None
        except OSError:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {command}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, rest = text.partition(" ")
    if not pid.isdigit():
        return "another process"
    host, _, command = rest.partition(" ")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"PID {pid}{where}" + (f" ({command})" if command else "")
