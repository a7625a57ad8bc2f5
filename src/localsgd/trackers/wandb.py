"""Weights & Biases: one W&B run per localsgd run, offline unless ``WANDB_MODE`` says
otherwise (``wandb sync`` uploads the folder later), in ``WANDB_DIR`` or the output
folder's ``trackers/``, in ``WANDB_PROJECT`` or the project ``localsgd``; a study's runs
share its name as their group and a tag. The W&B run id is the run's id in the study's
store (``<study>-<run id>``), so an interrupted run that resumes continues it."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import wandb

from localsgd.trackers import Destination

PROJECT = "localsgd"
"""The W&B project when ``WANDB_PROJECT`` names none."""


class WandbRun:
    def __init__(self, where: Destination, config: Mapping[str, Any], resumed_at: int | None) -> None:
        if "WANDB_DIR" not in os.environ:
            where.root.mkdir(parents=True, exist_ok=True)
        # The run's own logs hold its output, and a study's progress owns the terminal;
        # several runs may share one process.
        settings = wandb.Settings(console="off", x_disable_stats=True)
        if "WANDB_SILENT" not in os.environ:
            settings.silent = True
        run_id = re.sub(r"[^A-Za-z0-9_-]", "_", f"{where.group}-{where.run_id}")
        self.run = wandb.init(
            # None: wandb reads its own environment variable.
            mode=None if "WANDB_MODE" in os.environ else "offline",
            dir=None if "WANDB_DIR" in os.environ else str(where.root),
            project=None if "WANDB_PROJECT" in os.environ else PROJECT,
            name=where.run_name,
            group=where.group,
            tags=[where.study] if where.study else None,
            id=run_id,
            resume="allow" if resumed_at is not None else None,
            config=dict(config),
            settings=settings,
            reinit="create_new",
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


def open_run(where: Destination, config: Mapping[str, Any], resumed_at: int | None) -> WandbRun:
    return WandbRun(where, config, resumed_at)
