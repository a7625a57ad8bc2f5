"""The results store: a directory of run records plus an SQLite index.

Layout::

    STORE/index.sqlite            one row per run: id, name, status, config, times, error
    STORE/plan.json               what the study that owns the store means to run
    STORE/.lock                   who writes the store (see :mod:`localsgd.records.lock`)
    STORE/runs/<id>/              the run's record (see :mod:`localsgd.records.record`)
    STORE/runs/<id>/checkpoint.pt the consensus model at the end
    STORE/runs/<id>.partial/checkpoints/   mid-run checkpoints: the last two, a file per rank each

A run is written under ``runs/<id>.partial/`` and renamed into place when it ends, then the
index is updated: a run killed half-way leaves only a ``.partial`` folder, which the next
attempt resumes from its last checkpoint (the rows after it are dropped) or, without one,
deletes, so the store never holds half a run or the same rows twice. A store belongs to
the study named in its ``plan.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsgd.records.group import GroupWrite
from localsgd.records.lock import FileLock
from localsgd.records.record import (
    RECORD_VERSION,
    ConfigSnapshot,
    Environment,
    ErrorInfo,
    MetricsRow,
    RecordError,
    RecordVersionError,
    Status,
    failed_status,
    from_json,
    read_json,
    read_metrics,
    read_metrics_stream,
    to_json,
)
from localsgd.util.files import DiskFull, no_space, write_json_atomic

FINISHED = ("completed", "failed", "diverged")
DEFAULT_RUN_STORE = "studies_out/train"
"""Where a single run (``localsgd train``, a hand-run torchrun) is recorded by default."""
STATUSES = (*FINISHED, "running")
CHECKPOINTS = "checkpoints"
"""A run folder's mid-run checkpoints (written by the trainer, kept while the run can resume)."""
LATEST = "latest.json"
"""In ``checkpoints/``: the step of the last checkpoint every rank has written."""
LOCK = ".lock"

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
);
CREATE TABLE IF NOT EXISTS meta (
    key       TEXT PRIMARY KEY,
    value     TEXT NOT NULL
)
"""


@dataclass
class RunRecord:
    """One finished run as read back from the store.

    ``problem`` says why the run's files could not be read (folder missing, corrupt
    status); such a run has an empty ``status_info`` and reports must not count it."""

    run_id: str
    name: str
    status: str
    config: dict[str, Any]
    path: Path
    status_info: Status
    problem: str | None = None

    @property
    def error(self) -> ErrorInfo | None:
        return self.status_info.error

    def metrics(self) -> list[MetricsRow]:
        """The evaluation rows, in order."""
        return read_metrics(self.path / "metrics.jsonl")

    def metrics_stream(self) -> tuple[list[MetricsRow], int | None]:
        """The evaluation rows, and the number of the last line of ``metrics.jsonl`` when
        it was cut off mid-write (dropped from the rows), else None."""
        return read_metrics_stream(self.path / "metrics.jsonl")

    def env(self) -> Environment | None:
        path = self.path / "env.json"
        return from_json(Environment, read_json(path), str(path)) if path.exists() else None


class Store:
    """A study directory (see the module docstring). Only one process writes to it; see
    :meth:`study_lock` and :meth:`run_lock`. ``create=False`` opens an existing store to
    read it (nothing is written, no lock is taken: a report may read a store a study is
    writing)."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        self.readonly = not create
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"store {str(self.root)!r} is a file; give a folder")
        if not create and not (self.root / "index.sqlite").is_file():
            raise ValueError(
                f"{str(self.root)!r} is not a localsgd store: no index.sqlite inside "
                "(expected the folder a study or train command wrote)"
            )
        try:
            if (self.root / "index.sqlite").exists():
                with self._db() as db:  # a corrupt index is named before anything is written
                    db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            if create:
                (self.root / "runs").mkdir(parents=True, exist_ok=True)
                self._create_index()
            with self._db() as db:
                if create:
                    for statement in _SCHEMA.split(";"):
                        db.execute(statement)
                db.execute("SELECT COUNT(*) FROM runs").fetchone()
        except sqlite3.DatabaseError as exc:
            if no_space(exc):
                raise DiskFull(self.root / "index.sqlite") from exc
            raise ValueError(
                f"{self.root / 'index.sqlite'} is not a readable SQLite index ({exc}); "
                "move it away to start the store afresh"
            ) from None
        except (NotADirectoryError, FileExistsError, PermissionError) as exc:
            raise ValueError(f"store {str(self.root)!r} cannot be written: {exc}") from None

    def _create_index(self) -> None:
        """Create ``index.sqlite`` with its tables in one step: built under another name and
        linked into place, so that a reader never finds an index without tables (which it
        would call corrupt). A store created at the same time by another process wins."""
        index = self.root / "index.sqlite"
        if index.exists():
            return
        tmp = self.root / f".index.sqlite.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            db = sqlite3.connect(tmp)
            try:
                with db:
                    for statement in _SCHEMA.split(";"):
                        db.execute(statement)
            finally:
                db.close()
            try:
                os.link(tmp, index)
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links
                if not index.exists():
                    os.replace(tmp, index)
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        path = self.root / "index.sqlite"
        if self.readonly:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        else:
            db = sqlite3.connect(path, timeout=30)
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        except sqlite3.OperationalError as exc:
            if no_space(exc):
                raise DiskFull(path) from exc
            raise
        finally:
            db.close()

    @staticmethod
    def lock_for_study(root: str | Path) -> FileLock:
        """The lock of the store at ``root``, exclusive: held by a study for as long as it
        runs (take it before reading the store, so that what is read stays true)."""
        return FileLock(Path(root) / LOCK, f"store {root}")

    @contextlib.contextmanager
    def run_lock(self, run_id: str) -> Iterator[None]:
        """The store's lock shared and run ``run_id``'s exclusive (in ``.lock.d/``), held
        for the block by a single run while it trains; raises
        :class:`~localsgd.records.lock.StoreInUse` when a study or the same run holds them."""
        with FileLock(self.root / LOCK, f"store {self.root}", shared=True):
            (self.root / f"{LOCK}.d").mkdir(exist_ok=True)
            with FileLock(self.root / f"{LOCK}.d" / run_id, f"run {run_id} in store {self.root}"):
                yield

    def owner(self) -> str | None:
        """The study the store belongs to (None: a store of single runs, or a store of a
        version that did not record it, whose ``plan.json`` then names it)."""
        try:
            with self._db() as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'study'").fetchone()
        except sqlite3.OperationalError:  # an index written before the table existed
            row = None
        if row is not None:
            return str(row[0])
        study = self.plan().get("study")
        return str(study) if study else None

    def set_owner(self, study: str) -> None:
        """Make the store study ``study``'s."""
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('study', ?)", (study,))

    def run_count(self) -> int:
        """How many runs the index holds (finished or not)."""
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def partial_dir(self, run_id: str) -> Path:
        return self.root / "runs" / f"{run_id}.partial"

    def status(self, run_id: str) -> str | None:
        """The run's status, reconciling a run that ended but was not yet indexed."""
        with self._db() as db:
            row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        if row[0] == "running" and (self.run_dir(run_id) / "status.json").exists():
            if self.readonly:
                path = self.run_dir(run_id) / "status.json"
                return from_json(Status, read_json(path), str(path)).status
            return self._index_finished(run_id)
        return str(row[0])

    def resumable(self, run_id: str) -> Path | None:
        """The folder of run ``run_id`` that holds a checkpoint to resume from: its
        ``.partial`` folder (the run was interrupted), or its finished folder when the run
        failed; None when there is none."""
        partial = self.partial_dir(run_id)
        if (partial / CHECKPOINTS / LATEST).is_file():
            return partial
        final = self.run_dir(run_id)
        if (final / CHECKPOINTS / LATEST).is_file():
            status = self.final_status(run_id)
            if status is not None and status.status == "failed":
                return final
        return None

    def begin(self, run_id: str, name: str, config: Mapping[str, Any], *, resume: bool = False) -> Path:
        """Start (or restart) a run: a clean ``.partial`` folder holding ``config.json``,
        and an index row. ``resume``: when the run has a checkpoint (:meth:`resumable`),
        keep its folder instead -- the trainer continues from the checkpoint and rewrites
        the metrics rows up to it -- and drop what the interrupted attempt left after it
        (its status, its workers' error files)."""
        final = self.run_dir(run_id)
        partial = self.partial_dir(run_id)
        keep = self.resumable(run_id) if resume else None
        # Index first: a crash after this leaves a 'running' row, which a rerun restarts.
        with self._db() as db:
            db.execute(
                """INSERT INTO runs (run_id, name, status, config, started, attempts)
                   VALUES (?, ?, 'running', ?, ?, 1)
                   ON CONFLICT(run_id) DO UPDATE SET status = 'running', started = excluded.started,
                       finished = NULL, error = NULL, attempts = runs.attempts + 1""",
                (run_id, name, json.dumps(dict(config), sort_keys=True), time.time()),
            )
        if keep is not None:
            if keep == final:
                os.replace(final, partial)  # a failed run resumed: unfinished again
            for stale in ("status.json", "errors"):
                path = partial / stale
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        else:
            if final.exists():
                shutil.rmtree(final)  # a finished run being redone on purpose
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        snapshot = ConfigSnapshot(RECORD_VERSION, run_id, dict(config))
        write_json_atomic(partial / "config.json", to_json(snapshot))
        return partial

    def begin_many(self, runs: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[Path]:
        """:meth:`begin` (without ``resume``) for each ``(run_id, name, config)`` of a batch
        of trials that start together: one index transaction and one group commit of
        their ``config.json`` files. Returns their ``.partial`` folders, in order."""
        started = time.time()
        with self._db() as db:
            db.executemany(
                """INSERT INTO runs (run_id, name, status, config, started, attempts)
                   VALUES (?, ?, 'running', ?, ?, 1)
                   ON CONFLICT(run_id) DO UPDATE SET status = 'running', started = excluded.started,
                       finished = NULL, error = NULL, attempts = runs.attempts + 1""",
                [
                    (run_id, name, json.dumps(dict(config), sort_keys=True), started)
                    for run_id, name, config in runs
                ],
            )
        group = GroupWrite()
        folders = []
        for run_id, _, config in runs:
            final, partial = self.run_dir(run_id), self.partial_dir(run_id)
            if final.exists():
                shutil.rmtree(final)  # a finished run being redone on purpose
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            group.add_json(
                partial / "config.json", to_json(ConfigSnapshot(RECORD_VERSION, run_id, dict(config)))
            )
            folders.append(partial)
        group.commit()
        return folders

    def finish(self, run_id: str, *, error: ErrorInfo | None = None) -> str:
        """Move the ``.partial`` folder into place and index its status.

        ``error`` is the root cause an engine found (the first worker to fail): it replaces
        the error of a failed status (a rank that failed because a peer did), and a run
        without a ``status.json`` (its workers died first) is recorded as failed with it."""
        partial = self.partial_dir(run_id)
        if not partial.exists():
            raise ValueError(f"run {run_id} has no .partial folder to finish")
        status_path = partial / "status.json"
        if error is not None:
            # The error names files where the workers wrote them; they are read after the move.
            error = _moved(error, partial, self.run_dir(run_id))
        if not status_path.exists():
            lost = ErrorInfo("RunLost", "the run ended without writing a status")
            # What the run got done is in the rows rank 0 logged before the workers died.
            try:
                rows = read_metrics(partial / "metrics.jsonl")
            except RecordError:
                rows = []
            write_json_atomic(status_path, to_json(failed_status(error or lost, rows)))
        else:
            status = from_json(Status, read_json(status_path), str(status_path))
            if status.status == "failed" and error is not None:
                write_json_atomic(status_path, to_json(_with_error(status, error)))
            elif status.status != "failed":
                # Finished for good: its checkpoints can resume nothing any more.
                shutil.rmtree(partial / CHECKPOINTS, ignore_errors=True)
        os.replace(partial, self.run_dir(run_id))
        return self._index_finished(run_id)

    def finish_many(self, run_ids: Sequence[str], *, error: ErrorInfo | None = None) -> list[str]:
        """:meth:`finish` for runs that ended at one moment (trials of a batch): each folder
        moved into place as :meth:`finish` moves it, then one index transaction for all.
        A run whose folder has a status of its own is finished by it; a run killed before
        its index row was updated is reconciled by :meth:`status`. Returns the statuses."""
        finished: list[tuple[str, Status]] = []
        for run_id in run_ids:
            partial = self.partial_dir(run_id)
            status_path = partial / "status.json"
            if error is not None or not status_path.exists():
                self.finish(run_id, error=error)  # rare: a failure, rewritten with its root error
                finished.append((run_id, self._read_status(self.run_dir(run_id) / "status.json")))
                continue
            status = self._read_status(status_path)
            if status.status != "failed":
                shutil.rmtree(partial / CHECKPOINTS, ignore_errors=True)
            os.replace(partial, self.run_dir(run_id))
            finished.append((run_id, status))
        if finished:
            now = time.time()
            with self._db() as db:
                db.executemany(
                    "UPDATE runs SET status = ?, finished = ?, error = ? WHERE run_id = ?",
                    [(s.status, now, s.error.line() if s.error else None, run_id) for run_id, s in finished],
                )
        return [s.status for _, s in finished]

    @staticmethod
    def _read_status(path: Path) -> Status:
        return from_json(Status, read_json(path), str(path))

    def _index_finished(self, run_id: str) -> str:
        path = self.run_dir(run_id) / "status.json"
        status = from_json(Status, read_json(path), str(path))
        with self._db() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished = ?, error = ? WHERE run_id = ?",
                (status.status, time.time(), status.error.line() if status.error else None, run_id),
            )
        return status.status

    def final_status(self, run_id: str) -> Status | None:
        """The status of a finished run (None when it is not finished)."""
        path = self.run_dir(run_id) / "status.json"
        if not path.exists():
            return None
        return from_json(Status, read_json(path), str(path))

    def error(self, run_id: str) -> ErrorInfo | None:
        """The root error of a finished run (None when it did not fail or is not finished)."""
        status = self.final_status(run_id)
        return None if status is None else status.error

    def write_plan(self, plan: Mapping[str, Any]) -> None:
        """Record what a study intends to run (``plan.json``), for reports."""
        write_json_atomic(self.root / "plan.json", dict(plan))

    def plan(self) -> dict[str, Any]:
        """The study's plan (``{}`` for a store of single runs)."""
        path = self.root / "plan.json"
        if not path.exists():
            return {}
        plan = read_json(path)
        if not isinstance(plan, dict):
            raise RecordError(f"{path} is malformed: expected a JSON object")
        return plan

    def records(self, *, statuses: tuple[str, ...] = FINISHED) -> list[RunRecord]:
        """Finished runs (by default), in the order they were first started. A run whose
        files are missing or unreadable comes back with ``problem`` set; a record of
        another version raises :class:`RecordError`."""
        with self._db() as db:
            rows = db.execute(
                "SELECT run_id, name, status, config FROM runs ORDER BY started, run_id"
            ).fetchall()
        out = []
        for run_id, name, status, config in rows:
            if status == "running":
                try:
                    status = self.status(run_id) or status
                except RecordVersionError:
                    raise
                except RecordError:
                    pass  # a broken status of an unfinished run: it is not finished
            if status not in statuses:
                continue
            path = self.run_dir(run_id)
            problem = None
            info = Status(RECORD_VERSION, "failed")
            status_path = path / "status.json"
            if not path.is_dir():
                problem = f"run folder {path} is missing"
            else:
                try:
                    info = from_json(Status, read_json(status_path), str(status_path))
                except RecordVersionError:
                    raise
                except RecordError as exc:
                    problem = str(exc)
            out.append(RunRecord(run_id, name, status, json.loads(config), path, info, problem))
        return out


def _moved(error: ErrorInfo, partial: Path, final: Path) -> ErrorInfo:
    """``error`` with the paths into the run's ``.partial`` folder pointing into its final one."""
    from dataclasses import replace

    old, new = str(partial), str(final)
    return replace(
        error, message=error.message.replace(old, new), traceback=error.traceback.replace(old, new)
    )


def _with_error(status: Status, error: ErrorInfo) -> Status:
    from dataclasses import replace

    return replace(status, error=error)
