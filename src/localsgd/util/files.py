"""Atomic file writes: a file is either its old self or completely new, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh path beside ``path`` for the block to create; it replaces ``path`` (after an
    fsync) only if the block succeeds. The file gets the usual umask, not ``mkstemp``'s
    0600, so results stay readable to the rest of a team."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write bytes or text to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
