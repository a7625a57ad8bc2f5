"""The run writer that also feeds the trackers: every engine path writes its rows through
a :class:`~localsgd.records.record.RunWriter` in the one process that records the run
(rank 0, the controller, the process of a simulated run), so the trackers are fed there
and nowhere else."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localsgd.records.group import GroupWrite
from localsgd.records.record import MetricsRow, RunWriter, Status
from localsgd.trackers import Destination, Tracker, opener, row_values

if TYPE_CHECKING:
    from localsgd.run.config import RunConfig

log = logging.getLogger(__name__)

TRACKERS_FOLDER = "trackers"
"""The folder of a store (or of a run outside one) the trackers write into by default."""


def run_writer(config: RunConfig, run_dir: Path | None) -> RunWriter:
    """The writer of ``config``'s record in ``run_dir`` (None: a rank that records nothing),
    feeding ``train.log_to``'s trackers as well when there are any."""
    if run_dir is None or not config.train.log_to:
        return RunWriter(run_dir)
    return TrackedWriter(run_dir, config, destination(config, run_dir))


def destination(config: RunConfig, run_dir: Path) -> Destination:
    """Where ``config``'s run in ``run_dir`` is tracked: a run of a store
    (``<store>/runs/<id>[.partial]``) into the store's ``trackers/``, grouped by the study
    that owns the store; a run elsewhere into its own folder's ``trackers/``."""
    from localsgd.records.store import Store
    from localsgd.report.labels import variant_label

    store_root = run_dir.parent.parent
    study = None
    if run_dir.parent.name == "runs" and (store_root / "index.sqlite").is_file():
        root = store_root / TRACKERS_FOLDER
        try:
            study = Store(store_root, create=False).owner()
        except Exception as exc:  # an unreadable owner only loses the grouping
            log.warning("trackers: the study owning %s is unknown (%s)", store_root, exc)
    else:
        root = run_dir / TRACKERS_FOLDER
    run_id = config.run_id()
    name = (
        f"{variant_label(config.to_dict())} K={config.workers} lr={config.optimizer.lr:g} seed={config.seed}"
    )
    return Destination(
        root=root,
        run_id=run_id,
        run_name=name,
        study=study,
        group=study or config.name,
        folder=f"{_slug(name)}-{run_id}",
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")[:80]


class TrackedWriter(RunWriter):
    """A :class:`~localsgd.records.record.RunWriter` whose rows and final status also go
    to ``config.train.log_to``'s trackers. A tracker's library missing is the run's error
    (:class:`~localsgd.util.checks.ConfigError` naming the pip extra); a tracker failing
    later is dropped with a warning, and the run and its record go on untouched. The
    trackers open at the first row (or at the resume that precedes it): a resumed run's
    trackers continue from the checkpoint's step."""

    def __init__(self, run_dir: Path, config: RunConfig, where: Destination) -> None:
        super().__init__(run_dir)
        self.config, self.where = config, where
        self.names: Sequence[str] = config.train.log_to
        for name in self.names:
            opener(name)  # the library is there, or the run fails now, naming the extra
        self.trackers: dict[str, Tracker] | None = None

    def _trackers(self, resumed_at: int | None) -> dict[str, Tracker]:
        if self.trackers is None:
            self.trackers = {}
            params: dict[str, Any] = {**self.config.to_dict(), "run_id": self.where.run_id}
            for name in self.names:
                try:
                    self.trackers[name] = opener(name)(self.where, params, resumed_at)
                except Exception as exc:
                    log.warning("tracker %s: not logging run %s: %s", name, self.where.run_id, _line(exc))
        return self.trackers

    def restore(self, rows: Sequence[MetricsRow]) -> None:
        super().restore(rows)
        self._trackers(rows[-1].step if rows else 0)

    def row(self, row: MetricsRow) -> None:
        super().row(row)  # the record first: a tracker never costs the run a row
        values = row_values(row)
        self._each(lambda tracker: tracker.log(row.step, values))

    def status(self, status: Status, group: GroupWrite | None = None) -> None:
        super().status(status, group)
        self._each(lambda tracker: tracker.close(status.status))
        self.trackers = {}

    def _each(self, call: Any) -> None:
        trackers = self._trackers(None)
        for name in list(trackers):
            try:
                call(trackers[name])
            except Exception as exc:
                log.warning("tracker %s: stopped logging run %s: %s", name, self.where.run_id, _line(exc))
                del trackers[name]


def _line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
