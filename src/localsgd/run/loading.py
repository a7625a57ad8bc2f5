"""Reading configs: TOML files and ``--set`` overrides, checked against the typed schema.

Validation and the dict-to-dataclass machinery live in :mod:`localsgd.util.checks`; this
module reads files and applies ``--set section.key=value`` strings, whose values keep the
field's type.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from localsgd.run.config import RunConfig, run_config
from localsgd.util.checks import ConfigError
from localsgd.util.nest import deep_copy


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable or malformed file is a ``ConfigError``
    naming it."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise ConfigError(f"config file {str(p)!r} {what}")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(p)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"algorithm.period=16"`` -> (["algorithm", "period"], 16). The value is read as a
    TOML value (numbers, booleans, strings, lists, inline tables), else as a bare string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``key.path=value`` override set."""
    out = deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and i == 0 and part == "workload":
                child = node[part] = {"name": child}  # `workload = "name"` is the short form
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a table")
            node = child
        node[path[-1]] = value
    return out


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
