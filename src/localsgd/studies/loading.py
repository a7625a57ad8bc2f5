"""Reading study files: a grid or a study in stages, with ``--set`` overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from localsgd.run.loading import load_toml
from localsgd.studies.grid import Study, load_grid
from localsgd.studies.stages import load_stages


def load_study(path: str | Path, overrides: Sequence[str] | None = None) -> Study:
    """Parse a study file: ``[[grid]]`` blocks (:func:`localsgd.studies.grid.load_grid`) or
    ``[[stage]]`` tables (:func:`localsgd.studies.stages.load_stages`); ``overrides``
    (``key=value``) apply to ``[base]`` (to every stage's base in a study in stages)."""
    data = load_toml(path)
    if "stage" in data:
        return load_stages(data, list(overrides or []))
    return load_grid(data, list(overrides or []))
