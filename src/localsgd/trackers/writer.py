"""The run writer that also feeds the trackers: every engine path writes its rows through
a :class:`~localsgd.records.record.RunWriter` in the one process that records the run
(rank 0, the controller, the process of a simulated run), so the trackers are fed there
and nowhere else."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from localsgd.records.group import GroupWrite
from localsgd.records.record import MetricsRow, RunWriter, Status
from localsgd.trackers import Destination, Tracker, opener, row_values

log = logging.getLogger(__name__)


class TrackedWriter(RunWriter):
    """A :class:`~localsgd.records.record.RunWriter` whose rows and final status also go
    to the trackers ``names``, with ``params`` (the resolved config) as the run's. A
    tracker's library missing is the run's error (:class:`~localsgd.util.checks.ConfigError`
    naming the pip extra); a tracker failing later is dropped with a warning, and the run
    and its record go on untouched. The trackers open at the first row (or at the resume
    that precedes it): a resumed run's trackers continue from the checkpoint's step."""

    def __init__(
        self, run_dir: Path, names: Sequence[str], params: Mapping[str, Any], where: Destination
    ) -> None:
        super().__init__(run_dir)
        self.names, self.params, self.where = names, params, where
        for name in names:
            opener(name)  # the library is there, or the run fails now, naming the extra
        self.trackers: dict[str, Tracker] | None = None

    def _trackers(self, resumed_at: int | None) -> dict[str, Tracker]:
        if self.trackers is None:
            self.trackers = {}
            for name in self.names:
                try:
                    self.trackers[name] = opener(name)(self.where, self.params, resumed_at)
                except Exception as exc:
                    log.warning("tracker %s: not logging run %s: %s", name, self.where.run_id, _line(exc))
            if self.trackers:
                log.info(
                    "run %s: logging to %s (where the environment names no other place: %s)",
                    self.where.run_id,
                    ", ".join(self.trackers),
                    self.where.root,
                )
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

    def _each(self, call: Callable[[Tracker], None]) -> None:
        trackers = self._trackers(None)
        for name in list(trackers):
            try:
                call(trackers[name])
            except Exception as exc:
                log.warning("tracker %s: stopped logging run %s: %s", name, self.where.run_id, _line(exc))
                del trackers[name]


def _line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
