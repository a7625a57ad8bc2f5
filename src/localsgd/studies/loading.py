"""Reading run configs from files (TOML or the JSON a run record holds) plus overrides."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from localsgd.studies.configs import ConfigError, apply_overrides, load_toml
from localsgd.studies.schema import RunConfig, run_config


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A run config from ``path`` (``.toml`` or ``.json``) with ``--set`` overrides."""
    p = Path(path)
    if p.suffix == ".json":
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid JSON: {exc}") from None
    else:
        data = load_toml(p)
    return run_config(apply_overrides(data, overrides))
