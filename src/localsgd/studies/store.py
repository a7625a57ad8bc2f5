"""The results store: a directory of run records plus an SQLite index.

Layout::

    STORE/index.sqlite            one row per run: id, name, status, config, times, error
    STORE/runs/<id>/config.json   the resolved run config
    STORE/runs/<id>/env.json      versions, git SHA, host, command, world
    STORE/runs/<id>/metrics.jsonl one row per evaluation
    STORE/runs/<id>/status.json   completed | failed (with the error) | diverged, and totals
    STORE/runs/<id>/checkpoint.pt the consensus model at the end

A run is written under ``runs/<id>.partial/`` and renamed into place when it ends, then the
index is updated: a run killed half-way leaves only a ``.partial`` folder, which the next
attempt deletes, so the store never holds half a run or the same rows twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FINISHED = ("completed", "failed", "diverged")
STATUSES = (*FINISHED, "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id    TEXT PRIMARY KEY,
    name      TEXT NOT NULL,
    status    TEXT NOT NULL,
    config    TEXT NOT NULL,
    started   REAL,
    finished  REAL,
    error     TEXT,
    attempts  INTEGER NOT NULL DEFAULT 0
)
"""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other readers
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class RunRecord:
    """One finished run as read back from the store."""

    run_id: str
    name: str
    status: str
    config: dict[str, Any]
    error: str | None
    path: Path
    status_info: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> list[dict[str, Any]]:
        """The evaluation rows, in order."""
        rows = []
        metrics_path = self.path / "metrics.jsonl"
        if metrics_path.exists():
            with metrics_path.open() as f:
                rows = [json.loads(line) for line in f if line.strip()]
        return rows

    def env(self) -> dict[str, Any]:
        env_path = self.path / "env.json"
        return json.loads(env_path.read_text()) if env_path.exists() else {}


class Store:
    """A study directory (see the module docstring). Only one process writes to it."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        if not create and not (self.root / "index.sqlite").exists():
            raise ValueError(
                f"{str(self.root)!r} is not a localsgd store: no index.sqlite inside "
                "(expected the folder a study or train command wrote)"
            )
        (self.root / "runs").mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(_SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.root / "index.sqlite", timeout=30)
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def status(self, run_id: str) -> str | None:
        """The run's status, reconciling a run that ended but was not yet indexed."""
        with self._db() as db:
            row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        if row[0] == "running" and (self.run_dir(run_id) / "status.json").exists():
            return self._index_finished(run_id)
        return str(row[0])

    def begin(self, run_id: str, name: str, config: Mapping[str, Any]) -> Path:
        """Start (or restart) a run: a clean ``.partial`` folder and an index row."""
        final = self.run_dir(run_id)
        partial = final.with_name(f"{run_id}.partial")
        # Index first: a crash after this leaves a 'running' row, which a rerun restarts.
        with self._db() as db:
            db.execute(
                """INSERT INTO runs (run_id, name, status, config, started, attempts)
                   VALUES (?, ?, 'running', ?, ?, 1)
                   ON CONFLICT(run_id) DO UPDATE SET status = 'running', started = excluded.started,
                       finished = NULL, error = NULL, attempts = runs.attempts + 1""",
                (run_id, name, json.dumps(dict(config), sort_keys=True), time.time()),
            )
        if final.exists():
            shutil.rmtree(final)  # a finished run being redone on purpose
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        write_json_atomic(partial / "config.json", dict(config))
        return partial

    def finish(self, run_id: str, *, error: str | None = None) -> str:
        """Move the ``.partial`` folder into place and index its status.

        Without a ``status.json`` (the workers died before writing one) the run is recorded
        as failed with ``error``."""
        partial = self.run_dir(run_id).with_name(f"{run_id}.partial")
        if not partial.exists():
            raise ValueError(f"run {run_id} has no .partial folder to finish")
        if not (partial / "status.json").exists():
            write_json_atomic(
                partial / "status.json",
                {"status": "failed", "error": error or "the run ended without a status"},
            )
        os.replace(partial, self.run_dir(run_id))
        return self._index_finished(run_id)

    def _index_finished(self, run_id: str) -> str:
        info = json.loads((self.run_dir(run_id) / "status.json").read_text())
        status = info.get("status")
        if status not in FINISHED:
            raise ValueError(f"run {run_id}: status.json has status {status!r}; allowed: {FINISHED}")
        with self._db() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished = ?, error = ? WHERE run_id = ?",
                (status, time.time(), info.get("error"), run_id),
            )
        return str(status)

    def write_plan(self, plan: Mapping[str, Any]) -> None:
        """Record what a study intends to run (``plan.json``), for reports."""
        write_json_atomic(self.root / "plan.json", dict(plan))

    def plan(self) -> dict[str, Any] | None:
        """The study's plan, if one was recorded."""
        path = self.root / "plan.json"
        return json.loads(path.read_text()) if path.exists() else None

    def records(self, *, statuses: tuple[str, ...] = FINISHED) -> list[RunRecord]:
        """Finished runs (by default), in the order they were first started."""
        with self._db() as db:
            rows = db.execute(
                "SELECT run_id, name, status, config, error FROM runs ORDER BY started, run_id"
            ).fetchall()
        out = []
        for run_id, name, status, config, error in rows:
            if status == "running":
                status = self.status(run_id) or status
            if status not in statuses:
                continue
            path = self.run_dir(run_id)
            status_path = path / "status.json"
            info = json.loads(status_path.read_text()) if status_path.exists() else {}
            out.append(RunRecord(run_id, name, status, json.loads(config), error, path, info))
        return out
