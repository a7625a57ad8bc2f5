"""Group commits: the files that many runs write at one moment (a batch of trials that
start together, or several that finish at one evaluation) committed together, each as
atomically as :func:`~localsgd.util.files.write_atomic` writes one, with one flush of the
filesystem for the whole group instead of one ``fsync`` per file.

A commit writes every file under a temporary name beside its target, makes them all
durable at once (``syncfs`` of their filesystem on Linux; one ``fsync`` per file
elsewhere), renames each into place, and makes the renames durable the same way. A
process killed at any point leaves each target either as it was or complete, never
half-written; once :meth:`GroupWrite.commit` returns, every file of the group is on disk.
On a full disk every temporary file is removed and :class:`~localsgd.util.files.DiskFull`
names the file whose write failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from pathlib import Path
from typing import Any

from localsgd.util.files import disk_full, temporary_name


def json_text(data: Any) -> str:
    """``data`` as :func:`~localsgd.util.files.write_json_atomic` writes it."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


class GroupWrite:
    """Files to commit together (see the module docstring). A later :meth:`add` of the same
    path replaces the earlier one: the last version is what the commit writes."""

    def __init__(self) -> None:
        self.files: dict[Path, bytes] = {}

    def __len__(self) -> int:
        return len(self.files)

    def add(self, path: Path, data: bytes | str) -> None:
        self.files[Path(path)] = data.encode() if isinstance(data, str) else bytes(data)

    def add_json(self, path: Path, data: Any) -> None:
        self.add(path, json_text(data))

    def commit(self) -> None:
        """Write every file (see the module docstring); the group is empty afterwards."""
        files, self.files = self.files, {}
        if not files:
            return
        temporary: dict[Path, Path] = {}
        current: Path | None = None
        try:
            for path, data in files.items():
                current = path
                tmp = temporary_name(path)
                with open(tmp, "xb") as f:
                    temporary[path] = tmp
                    f.write(data)
            current = None
            _flush(list(temporary.values()))  # the data is on disk before any name points at it
            for path, tmp in list(temporary.items()):
                os.replace(tmp, path)
                del temporary[path]
            _flush(sorted({p.parent for p in files}))  # the renames are on disk too
        except BaseException as exc:
            for tmp in temporary.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            full = disk_full(exc, current if current is not None else next(iter(files)))
            if full is not exc:
                raise full from exc
            raise


def _flush(paths: list[Path]) -> None:
    """Make what was written to ``paths`` (files or folders) durable: one ``syncfs`` per
    filesystem where the C library has it, else an ``fsync`` of each."""
    if not paths:
        return
    syncfs = _syncfs()
    if syncfs is not None:
        devices: dict[int, Path] = {}
        for path in paths:
            devices.setdefault(os.stat(path).st_dev, path)
        for path in devices.values():
            fd = os.open(path, os.O_RDONLY)
            try:
                if syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), str(path))
            finally:
                os.close(fd)
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            if path.is_dir():
                continue  # a system that cannot open a folder cannot fsync it either
            raise
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_SYNCFS: list[Any] = []


def _syncfs() -> Any:
    """``syncfs(2)`` from the C library, or None where there is none (not Linux)."""
    if not _SYNCFS:
        function = None
        with contextlib.suppress(OSError, AttributeError):
            function = ctypes.CDLL(None, use_errno=True).syncfs
            function.argtypes = [ctypes.c_int]
            function.restype = ctypes.c_int
        _SYNCFS.append(function)
    return _SYNCFS[0]
