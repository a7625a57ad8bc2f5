"""Human-readable names for runs: the algorithm and the hyperparameters that set it apart.

A run's ``algorithm`` table holds only what its author wrote (``{"name": "local_sgd"}`` means
H = 8); the registered config fills in the defaults, and its ``SYMBOLS`` and
``sync_period`` give the label and the H of the H·K view, so the report knows nothing
about any particular algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localsgd import algorithms
from localsgd.algorithms.base import AlgorithmConfig, format_value


def _config(spec: Mapping[str, Any]) -> AlgorithmConfig | None:
    """The registered config of a run's algorithm table; ``<x>_epoch`` keys (resolved to
    steps at run time) stand in as step 0. None for a name or table the registry refuses."""
    table = {k: v for k, v in spec.items() if not k.endswith("_epoch")}
    for key in spec:
        if key.endswith("_epoch"):
            table[key.removesuffix("_epoch") + "_step"] = 0
    try:
        return algorithms.build(table)
    except ValueError:
        return None


def variant_label(config: Mapping[str, Any]) -> str:
    """``"local_sgd H=4"``, ``"slowmo H=8 β=0.5 α=1"``, ``"sma α=1/K μ=0.9"``, ... for a
    run config dict (``RunConfig.to_dict()``)."""
    spec = dict(config.get("algorithm") or {})
    built = _config(spec)
    if built is None:
        return str(spec.get("name", "unknown"))
    label = built.label()
    for key, value in spec.items():
        if key.endswith("_epoch"):
            step_key = key.removesuffix("_epoch") + "_step"
            symbol = built.SYMBOLS.get(step_key, step_key)
            label = label.replace(f"{symbol}=0", f"{symbol}={format_value(value)}ep", 1)
    return label


def period(config: Mapping[str, Any]) -> int | None:
    """H of a run for the H·K view (the algorithm's ``sync_period``), None where the
    algorithm has no comparable period (SMA, unknown names)."""
    built = _config(dict(config.get("algorithm") or {}))
    return None if built is None else built.sync_period


def algorithm_name(config: Mapping[str, Any]) -> str:
    return str((config.get("algorithm") or {}).get("name", "unknown"))


def families() -> list[str]:
    """Every registered algorithm name, in the registry's (sorted) order: the order that
    gives each algorithm family its colour, the same in every figure and every report."""
    return algorithms.names()


def family_title(name: str) -> str:
    """An algorithm family's name for a panel title: its config class (``LocalSGD``,
    ``DiLoCo``), or the registry name when it is not registered here."""
    try:
        return algorithms.get(name).__name__
    except ValueError:
        return name
