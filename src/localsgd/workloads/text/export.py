"""A run's final model as a folder a later run starts from.

A workload that can export a model has ``export(model, folder)`` (the text workloads: a
``save_pretrained`` folder with the tokenizer, which ``[workload.model] path`` loads); a run
of such a workload leaves its final consensus model in ``RUN_DIR/model/``. A study's later
stage refers to it (``{ from_stage = "..." }``, see :mod:`localsgd.studies.stages`).
Workloads without the method export nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

MODEL_FOLDER = "model"
"""The exported model's folder inside a run folder."""


@runtime_checkable
class Exports(Protocol):
    """The capability: a workload that writes a trained model where a later run loads it."""

    def export(self, model: nn.Module, folder: Path) -> Path: ...


def export_model(workload: Any, model: nn.Module, run_dir: Path) -> Path | None:
    """Write ``model`` into ``run_dir/model`` when ``workload`` can export one; returns the
    folder, or None for a workload that cannot."""
    if not isinstance(workload, Exports):
        return None
    return workload.export(model, Path(run_dir) / MODEL_FOLDER)


def exported_model(run_dir: Path) -> Path | None:
    """The model a finished run exported, or None when it has none."""
    folder = Path(run_dir) / MODEL_FOLDER
    return folder if folder.is_dir() and any(folder.iterdir()) else None
