"""TensorBoard: one event-file folder per run, ``<output>/trackers/tensorboard/<run>``, so
that a study's runs sit side by side in one ``tensorboard --logdir``; the resolved config
as hyperparameters (the HParams dashboard) and as text."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from localsgd.trackers import Destination
from localsgd.util.nest import flatten

FOLDER = "tensorboard"


class TensorBoardRun:
    """A run's event files; ``resumed_at``: events after that step, left by the attempt
    that was interrupted, are purged (``SummaryWriter``'s ``purge_step``)."""

    def __init__(self, where: Destination, config: Mapping[str, Any], resumed_at: int | None) -> None:
        self.logdir = where.root / FOLDER / where.folder
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge)
        if resumed_at is None:
            # The session's hparams alone: without an experiment summary, TensorBoard's
            # HParams dashboard builds one from every run's session and scalar tags, so a
            # study's runs show side by side with their metrics as columns.
            _, start, _ = hparams(hparam_values(config), {})
            events = self.writer.file_writer
            assert events is not None, "SummaryWriter opens its event file on creation"
            events.add_summary(start)
            self.writer.add_text("config", "```\n" + json.dumps(dict(config), indent=2) + "\n```")
            self.writer.flush()

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        # Evaluations are minutes apart: a reader sees each as soon as it is made.
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


def hparam_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's dotted keys with values the HParams plugin takes (numbers, text,
    booleans); anything else as its JSON text."""
    return {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for key, value in flatten(config).items()
    }


def open_run(where: Destination, config: Mapping[str, Any], resumed_at: int | None) -> TensorBoardRun:
    return TensorBoardRun(where, config, resumed_at)
