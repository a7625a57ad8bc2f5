"""Atomic file writes: a file is either its old self or completely new, never half-written.

A write that fails because the filesystem is full (``ENOSPC``, or a quota's ``EDQUOT``)
raises :class:`DiskFull` naming the file; the temporary file is removed first, so a full
disk leaves every file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
EXIT_DISK_FULL = 4
"""The exit code of a command (``localsgd train``, ``study``, ``python -m localsgd.worker``)
that stopped because a file could not be written for want of space."""


class DiskFull(Exception):
    """A file could not be written: no space left on its device. Not a failure of the run:
    the command stops, leaving the run unfinished (resumable) once space is freed."""

    def __init__(self, path: str | Path, message: str | None = None) -> None:
        self.path = Path(path)
        super().__init__(message or f"no space left on device (ENOSPC) writing {path}")

    @classmethod
    def from_message(cls, message: str) -> DiskFull:
        """The error a worker recorded (its message names the file), raised again here."""
        _, sep, path = message.partition(" writing ")
        return cls(path if sep else "?", message)


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from or during) is a full disk:
    ``torch.save`` reports a failed write as a ``RuntimeError`` raised while handling the
    ``OSError``, SQLite as ``database or disk is full``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFull):
            return True
        if isinstance(current, OSError) and current.errno in NO_SPACE:
            return True
        if type(current).__name__ == "OperationalError" and "disk is full" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full(exc: BaseException, path: str | Path) -> BaseException:
    """``exc`` as :class:`DiskFull` naming ``path`` when it is a full disk, else ``exc``."""
    if isinstance(exc, DiskFull) or not no_space(exc):
        return exc
    return DiskFull(path)


def temporary_name(path: Path) -> Path:
    """The name :func:`atomic_path` writes ``path``'s new content under, beside it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")


TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp(\.[^.]+)?")
"""What :func:`temporary_name` names look like."""


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of atomic writes left anywhere under ``folder``: a process
    killed mid-write (a run's workers torn down when one of them failed) never reached the
    cleanup that :func:`atomic_path` does itself. Only when nothing writes there any more.
    Returns what it removed."""
    removed = []
    for path in Path(folder).rglob(".*"):
        if TEMPORARY.fullmatch(path.name) and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh path beside ``path`` for the block to create; it replaces ``path`` (after an
    fsync) only if the block succeeds. The file gets the usual umask, not ``mkstemp``'s
    0600, so results stay readable to the rest of a team."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = disk_full(exc, path)
        if full is not exc:
            raise full from exc
        raise


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write bytes or text to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_torch(obj: Any, path: Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (through a file object, so that a full
    disk is told apart from other failures); returns ``path``."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        torch.save(obj, f)
    return Path(path)
