"""Which split a report selects on: targets, steps-to-result and a search's best trial read
the held-out validation split unless told otherwise (Shallue et al. 2019 select on a
validation split and report test separately); the test split is what the report shows.

A workload whose runs hold no validation values (a workload of the user's without a
validation split, or ``validation_fraction = 0``) can only be selected on test: the report
says so for that workload rather than failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from localsgd.records import Metric
from localsgd.records.record import SPLITS
from localsgd.report.tables import VALIDATION, Study


@dataclass(frozen=True)
class Selection:
    """The split asked for (``--select-on``) and, per workload, the split used."""

    asked: str = "validation"
    used: dict[str, str] = field(default_factory=dict)
    """Per workload: ``validation`` or ``test``."""

    def split(self, workload: str) -> str:
        return self.used.get(workload, self.asked)

    def column(self, workload: str, metric: Metric) -> str:
        """The metrics frame's column of ``metric`` on the split used for ``workload``."""
        return f"{VALIDATION}{metric.name}" if self.split(workload) == "validation" else metric.name

    def final_column(self, workload: str, metric: Metric) -> str:
        """The runs frame's final value of ``metric`` on that split."""
        return f"final_{self.column(workload, metric)}"

    def sentence(self, workload: str) -> str:
        """How ``workload``'s selections were made, for the report."""
        used = self.split(workload)
        if used == self.asked == "validation":
            return f"{workload}: selected on the validation split (held out of the training data)"
        if used == self.asked:
            return f"{workload}: selected on the test split (--select-on test)"
        return f"{workload}: selected on the test split, as its runs hold no validation split"


def check_split(split: str, key: str = "--select-on") -> str:
    if split not in SPLITS:
        raise ValueError(f"{key} must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def selection(study: Study, asked: str = "validation") -> Selection:
    """The split each workload of ``study`` is selected on: ``asked``, or test for a
    workload none of whose evaluations holds a validation value."""
    check_split(asked)
    used: dict[str, str] = {}
    for workload in study.declared:
        used[workload] = asked
        if asked == "validation" and not _has_validation(study, workload):
            used[workload] = "test"
    return Selection(asked, used)


def _has_validation(study: Study, workload: str) -> bool:
    metric = study.primary(workload)
    column = f"final_{VALIDATION}{metric.name}" if metric else None
    if column is None or column not in study.runs.columns:
        return False
    values = study.runs.loc[study.runs["workload"].astype(str) == workload, column]
    return any(math.isfinite(float(v)) for v in values if v is not None)
