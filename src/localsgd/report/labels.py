"""Human-readable names for runs: the algorithm and the hyperparameters that set it apart.

A run's ``algorithm`` table holds only what its author wrote (``{"name": "local_sgd"}`` means
H = 8); the registered config fills in the defaults, and its ``SYMBOLS`` and
``sync_period`` give the label and the H of the H·K view, so the report knows nothing
about any particular algorithm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
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


def _epoch_texts(spec: Mapping[str, Any]) -> dict[str, str]:
    """``{"switch_step": "2.5ep"}`` for each ``<x>_epoch`` key of an algorithm table."""
    return {
        key.removesuffix("_epoch") + "_step": f"{format_value(value)}ep"
        for key, value in spec.items()
        if key.endswith("_epoch")
    }


def variant_label(config: Mapping[str, Any], omit: Sequence[str] = ()) -> str:
    """``"local_sgd H=4"``, ``"slowmo H=8 μ=0.5 η=1"``, ``"sma λ=1/K μ=0.9"``, ... for a
    run config dict (``RunConfig.to_dict()``), without the fields in ``omit``."""
    spec = dict(config.get("algorithm") or {})
    built = _config(spec)
    if built is None:
        return str(spec.get("name", "unknown"))
    return built.label(shown=_epoch_texts(spec), omit=omit)


def period_fields(built: AlgorithmConfig) -> list[str]:
    """The whole-number fields the algorithm's H (``sync_period``) follows: those whose
    change changes it (``period``; none for mini-batch SGD, whose H is always 1)."""
    out = []
    for f in dataclasses.fields(built):  # type: ignore[arg-type]
        value = getattr(built, f.name)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        # H + 1 may be refused where another field must divide H (streaming's fragments F).
        for candidate in (value + 1, 2 * value):
            try:
                moved = dataclasses.replace(built, **{f.name: candidate})  # type: ignore[type-var]
                break
            except ValueError:
                continue
        else:
            continue
        if moved.sync_period != built.sync_period:
            out.append(f.name)
    return out


def line_variant(config: Mapping[str, Any]) -> str:
    """The variant label without H: what the points of one line of the H·K view share."""
    built = _config(dict(config.get("algorithm") or {}))
    return variant_label(config, omit=period_fields(built) if built is not None else ())


def switch_epochs(config: Mapping[str, Any], steps_per_epoch: float) -> float | None:
    """Post-local SGD's switch point t' in epochs (``switch_epoch``, or ``switch_step`` over
    the run's steps per epoch), for an algorithm with a ``switch_step``; None otherwise."""
    spec = dict(config.get("algorithm") or {})
    built = _config(spec)
    if built is None or not hasattr(built, "switch_step"):
        return None
    if "switch_epoch" in spec:
        return float(spec["switch_epoch"])
    step = float(built.switch_step)
    return step / steps_per_epoch if steps_per_epoch > 0 else None


def without_switch(config: Mapping[str, Any]) -> str:
    """The variant label without its switch point: what the points of one line of the
    switch-point view share."""
    return variant_label(config, omit=("switch_step",))


def period(config: Mapping[str, Any]) -> int | None:
    """H of a run for the H·K view (the algorithm's ``sync_period``), None where the
    algorithm has no comparable period (SMA, unknown names)."""
    built = _config(dict(config.get("algorithm") or {}))
    return None if built is None else built.sync_period


def algorithm_name(config: Mapping[str, Any]) -> str:
    return str((config.get("algorithm") or {}).get("name", "unknown"))


def synchronous_baseline(name: str) -> bool:
    """Whether the algorithm family ``name`` is the synchronous baseline (mini-batch SGD)."""
    try:
        return algorithms.get(name).SYNCHRONOUS_BASELINE
    except ValueError:
        return False


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
