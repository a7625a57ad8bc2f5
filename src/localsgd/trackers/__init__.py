"""Experiment trackers (``[train] log_to``): a run's evaluations, learning rate and
communication counters, and its resolved config, sent to TensorBoard, Weights & Biases or
MLflow as well as to its own record.

Each tracker is optional: its library is imported only when a run asks for it (the pip
extra ``localsgd[trackers]`` installs all three), and each writes locally unless the
user's environment points it elsewhere, the usual way of that library (``WANDB_MODE``,
``WANDB_DIR``, ``WANDB_PROJECT``; ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``).
One process per run logs: the one that writes the run record
(:class:`~localsgd.trackers.writer.TrackedWriter`, made by
:func:`localsgd.run.tracking.run_writer`).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from localsgd.records.record import MetricsRow
from localsgd.util.checks import ConfigError

EXTRA = "localsgd[trackers]"
"""The pip extra that installs every tracker's library."""
FOLDER = "trackers"
"""The folder of a store (or of a run outside one) the trackers write into by default."""


@dataclass(frozen=True)
class Destination:
    """Where and under which names one run is tracked."""

    root: Path
    """The output folder the trackers write into when the environment names no other
    place: the run's study store (or its own folder outside a store), ``trackers/``."""
    run_id: str
    run_name: str
    """The variant's label, as the report names it, with what sets the run apart."""
    study: str | None
    """The study the run belongs to; None for a run of ``localsgd train``."""
    group: str
    """What groups runs in the tracker: the study, or the run config's name outside one."""
    folder: str
    """A folder name for this run alone (its label and id)."""


class Tracker(Protocol):
    """One tracker's run: opened with the resolved config, then one call per evaluation
    row, then closed with the run's final status (``completed``, ``failed``,
    ``diverged``). A run interrupted is left open, as its record is: it resumes later."""

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self, status: str) -> None: ...


class Opener(Protocol):
    def __call__(self, where: Destination, config: Mapping[str, Any], resumed_at: int | None) -> Tracker: ...


@dataclass(frozen=True)
class Kind:
    """A registered tracker: the module that opens it and the library it needs."""

    module: str
    library: str


TRACKERS: dict[str, Kind] = {
    "tensorboard": Kind("localsgd.trackers.tensorboard", "tensorboard"),
    "wandb": Kind("localsgd.trackers.wandb", "wandb"),
    "mlflow": Kind("localsgd.trackers.mlflow", "mlflow"),
}
"""``train.log_to`` values."""


def check_names(names: Sequence[str], key: str = "train.log_to") -> None:
    """``ConfigError`` naming ``key`` for an unknown or repeated tracker."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{key} must list trackers among {list(TRACKERS)}, got {name!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} names a tracker twice: {list(names)}")


def check_available(names: Sequence[str], key: str = "train.log_to") -> None:
    """``ConfigError`` naming the pip extra when a tracker's library is not installed."""
    for name in names:
        library = TRACKERS[name].library
        if importlib.util.find_spec(library) is None:
            raise ConfigError(
                f"{key} = {list(names)}: {name} needs the {library} package; pip install '{EXTRA}'"
            )


def opener(name: str) -> Opener:
    """The function that opens a ``name`` tracker's run (its library imported now)."""
    check_available([name])
    opened: Opener = importlib.import_module(TRACKERS[name].module).open_run
    return opened


def row_values(row: MetricsRow) -> dict[str, float]:
    """One evaluation as tracker scalars: each metric per split as ``<split>/<metric>``
    (``test``, ``validation``; ``train/loss``), the learning rate, and the communication
    counters so far (``comm/bytes``, ``comm/syncs``)."""
    out: dict[str, float] = {}
    for split, scores in (("test", row.metrics), ("validation", row.validation)):
        out.update({f"{split}/{name}": value for name, value in scores.items() if value is not None})
    if row.train_loss is not None:
        out["train/loss"] = row.train_loss
    if row.lr is not None:
        out["lr"] = row.lr
    out["comm/bytes"] = float(row.bytes)
    out["comm/syncs"] = float(row.syncs)
    return out
