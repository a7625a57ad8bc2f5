"""What every way of starting worker processes shares: the launcher command, the workers'
environment, and the error files through which a worker reports its own exception.

A worker that fails writes its exception to ``RUN_DIR/errors/rank<r>.json``; the first one
(by time) is the run's root cause, which the caller raises as
:class:`~localsgd.engines.base.WorkerFailure` instead of the launcher's summary.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from localsgd.records.record import ErrorInfo, RecordError, from_json, read_json
from localsgd.util.files import write_json_atomic

ERRORS = "errors"
WORKER_MODULE = "localsgd.worker"
"""The worker entry point every launch path starts (``python -m localsgd.worker``)."""


def torchrun_command(processes: int, program: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node P PROGRAM...``: one
    machine, a rendezvous on a free loopback port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(processes),
        *program,
    ]


def worker_env(threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for workers: ``threads`` intra-op threads, and the
    current directory on the import path (an import-path workload there must import in the
    workers as it does here)."""
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path, **(extra or {}))


def write_worker_error(run_dir: str | Path, rank: int, exc: BaseException) -> None:
    """Record worker ``rank``'s exception in the run folder (every rank may do this)."""
    folder = Path(run_dir) / ERRORS
    folder.mkdir(exist_ok=True)
    info = ErrorInfo.from_exception(exc, rank)
    write_json_atomic(folder / f"rank{rank}.json", {"time": time.time(), **info.__dict__})


def root_error(run_dir: Path) -> ErrorInfo | None:
    """The first error a worker recorded (by time), or None."""
    found: list[tuple[float, ErrorInfo]] = []
    for path in sorted((run_dir / ERRORS).glob("rank*.json")):
        try:
            data = read_json(path)
            when = float(data.pop("time"))
            found.append((when, from_json(ErrorInfo, data, str(path), versioned=False)))
        except (RecordError, KeyError, TypeError, ValueError, AttributeError):
            continue
    return min(found, key=lambda f: f[0])[1] if found else None


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
