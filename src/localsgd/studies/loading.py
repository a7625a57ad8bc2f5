"""Reading run configs and study files (TOML, or a run record's ``config.json``) plus overrides."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from localsgd.studies.configs import apply_overrides, load_toml
from localsgd.studies.grid import Study, load_grid
from localsgd.studies.schema import RunConfig, run_config
from localsgd.studies.stages import load_stages
from localsgd.util.checks import ConfigError


def load_study(path: str | Path, overrides: Sequence[str] | None = None) -> Study:
    """Parse a study file: ``[[grid]]`` blocks (:func:`localsgd.studies.grid.load_grid`) or
    ``[[stage]]`` tables (:func:`localsgd.studies.stages.load_stages`); ``overrides``
    (``key=value``) apply to ``[base]`` (to every stage's base in a study in stages)."""
    data = load_toml(path)
    if "stage" in data:
        return load_stages(data, list(overrides or []))
    return load_grid(data, list(overrides or []))


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A run config from ``path`` (``.toml``, or ``.json``: a run record's ``config.json``
    or a plain config) with ``--set`` overrides."""
    p = Path(path)
    if p.suffix == ".json":
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and {"version", "run_id", "config"} <= set(data):
            data = data["config"]  # a run record's snapshot
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a JSON object, got {type(data).__name__}")
    else:
        data = load_toml(p)
    return run_config(apply_overrides(data, overrides))
