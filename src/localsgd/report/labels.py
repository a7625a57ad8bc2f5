"""Human-readable names for runs: the algorithm and the hyperparameters that set it apart.

A run's ``algorithm`` table holds only what its author wrote (``{"name": "local_sgd"}`` means
H = 8), so defaults are filled in from the algorithm registry before labelling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# The paper symbol of each headline hyperparameter, in the order they are printed. Every
# other field appears as ``field=value`` only when it differs from its default.
SYMBOLS: dict[str, tuple[tuple[str, str], ...]] = {
    "minibatch_sgd": (),
    "gradient_accumulation": (("steps", "k"),),
    "local_sgd": (("period", "H"),),
    "post_local_sgd": (("switch_step", "t'"), ("switch_epoch", "t'"), ("period", "H")),
    "hierarchical_local_sgd": (("period", "H"), ("block_period", "Hb"), ("block_size", "G")),
    "slowmo": (("period", "H"), ("momentum", "β"), ("lr", "α")),
    "diloco": (("period", "H"), ("outer_lr", "η"), ("outer_momentum", "μ")),
    "sma": (("alpha", "α"), ("momentum", "μ")),
}

# Algorithms whose synchronisation period is H = ``period``; fully synchronous ones count as
# H = 1. Others (SMA, unknown) have no comparable period.
PERIODIC = ("local_sgd", "post_local_sgd", "hierarchical_local_sgd", "slowmo", "diloco")
SYNCHRONOUS = ("minibatch_sgd", "gradient_accumulation")


def _defaults(name: str) -> dict[str, Any]:
    """The registered config's field defaults, or ``{}`` for a name the registry lacks."""
    from localsgd.algorithms import get

    try:
        cls = get(name)
    except ValueError:
        return {}
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def algorithm_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's algorithm table with the registry defaults filled in."""
    spec = dict(config.get("algorithm") or {})
    name = str(spec.get("name", "unknown"))
    resolved = {**_defaults(name), **spec, "name": name}
    if "switch_epoch" in spec:
        resolved.pop("switch_step", None)  # resolved from the epoch only at run time
    return resolved


def variant_label(config: Mapping[str, Any]) -> str:
    """``"local_sgd H=4"``, ``"slowmo H=8 β=0.5 α=1"``, ``"sma α=1/K μ=0.9"``, ... for a
    run config dict (``RunConfig.to_dict()``)."""
    spec = algorithm_spec(config)
    name = spec.pop("name")
    defaults = _defaults(name)
    parts = [name]
    symbols = SYMBOLS.get(name, ())
    for key, symbol in symbols:
        if key not in spec:
            continue
        value = spec.pop(key)
        if key == "alpha" and value is None:
            parts.append(f"{symbol}=1/K")
        elif key == "switch_epoch":
            parts.append(f"{symbol}={_fmt(value)}ep")
        else:
            parts.append(f"{symbol}={_fmt(value)}")
    for key in sorted(spec):
        if key not in defaults or spec[key] != defaults[key]:
            parts.append(f"{key}={_fmt(spec[key])}")
    return " ".join(parts)


def period(config: Mapping[str, Any]) -> int | None:
    """H of a run for the accuracy-against-H·K plot: ``period`` for the periodic algorithms,
    1 for the synchronous ones, None for the rest (SMA, unknown names)."""
    spec = algorithm_spec(config)
    if spec["name"] in SYNCHRONOUS:
        return 1
    if spec["name"] in PERIODIC and isinstance(spec.get("period"), int):
        return int(spec["period"])
    return None
