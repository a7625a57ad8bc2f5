"""Metaparameter search in a study: a ``[grid.search]`` table turns each point of its grid
block into ``trials`` runs at quasi-random points of a search space (Shallue et al. 2019,
§3: a quasi-random search per batch size; about 100 trials per batch size in the paper).

::

    [[grid]]
    data.batch_size = [16, 64, 256]
    [grid.search]
    trials = 16
    seed = 0                                    # the scrambling of the sequence
    method = "sobol"                            # or "halton" (scipy.stats.qmc)
    lr = { log = [1e-3, 10] }                   # optimizer.lr, log-uniform
    momentum = { one_minus_log = [1e-3, 0.5] }  # 1 − optimizer.momentum, log-uniform
    warmup_epochs = { uniform = [0, 5] }        # schedule.warmup_epochs, uniform

A dimension is any run-config key (dotted, ``"optimizer.weight_decay"``) or one of the short
names in :data:`ALIASES`. Trial i of every grid point takes point i of one scrambled Sobol
(or Halton) sequence, so a run's config, and with it its id, depends only on the block and
the trial: an interrupted search resumes like any study, and raising ``trials`` keeps the
runs already done (the sequence's first points do not change). Each trial is an ordinary
run whose metaparameters are ordinary config fields.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from localsgd.util.checks import ConfigError, check_choice, check_int

SPACES = ("log", "one_minus_log", "uniform")
"""``log``: log-uniform in [low, high] (0 < low < high); ``one_minus_log``: 1 − v is
log-uniform in [low, high] (0 < low < high ≤ 1; for momentum, Shallue et al.'s 1 − γ);
``uniform``: uniform in [low, high]."""
METHODS = ("sobol", "halton")
ALIASES = {
    "lr": "optimizer.lr",
    "momentum": "optimizer.momentum",
    "weight_decay": "optimizer.weight_decay",
    "warmup_epochs": "schedule.warmup_epochs",
}
OPTIONS = ("trials", "seed", "method")
MAX_TRIALS = 65536


@dataclass(frozen=True)
class Dimension:
    """One searched run-config key and its space."""

    path: str
    kind: str
    low: float
    high: float

    def value(self, u: float) -> float:
        """The value at ``u`` in [0, 1)."""
        if self.kind == "uniform":
            return self.low + u * (self.high - self.low)
        logged = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return logged if self.kind == "log" else 1.0 - logged


@dataclass(frozen=True)
class Search:
    """A grid block's ``[grid.search]``."""

    trials: int
    seed: int
    method: str
    dimensions: tuple[Dimension, ...]

    @property
    def paths(self) -> list[str]:
        return [d.path for d in self.dimensions]

    def points(self) -> list[dict[str, float]]:
        """The ``trials`` points, each ``{path: value}``, in trial order."""
        from scipy.stats import qmc

        d = len(self.dimensions)
        if self.method == "sobol":
            # Whole powers of two keep Sobol's balance (scipy warns otherwise); the first
            # ``trials`` of them are the same points for any larger power.
            sampler = qmc.Sobol(d, scramble=True, seed=self.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                unit = sampler.random_base2(max(0, math.ceil(math.log2(self.trials))))[: self.trials]
        else:
            unit = qmc.Halton(d, scramble=True, seed=self.seed).random(self.trials)
        return [{dim.path: dim.value(float(u)) for dim, u in zip(self.dimensions, row)} for row in unit]


def parse(table: Any, where: str) -> Search:
    """``[grid.search]`` as a :class:`Search`; ``ConfigError`` naming ``<where>.search.<key>``."""
    key = f"{where}.search"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{key} must be a table (trials, seed, method and the searched keys)")
    if "trials" not in table:
        raise ConfigError(f"{key}.trials is missing: how many trials per grid point (1 to {MAX_TRIALS})")
    trials = table["trials"]
    check_int(f"{key}.trials", trials, 1, MAX_TRIALS)
    seed = table.get("seed", 0)
    check_int(f"{key}.seed", seed, 0, 2**32 - 1)
    method = table.get("method", "sobol")
    check_choice(f"{key}.method", method, METHODS)
    dimensions = [_dimension(path, space, key) for path, space in _spaces(table, key)]
    if not dimensions:
        raise ConfigError(
            f"{key} searches nothing: give at least one key with a space, such as "
            "lr = { log = [1e-3, 10] }"
        )
    paths = [d.path for d in dimensions]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ConfigError(f"{key} gives {twice[0]!r} twice (a short name and its dotted key)")
    return Search(trials, seed, method, tuple(dimensions))


def _spaces(table: Mapping[str, Any], key: str, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, space table) pairs: nested tables are followed down to a table that
    names a space (TOML's ``optimizer.lr = {...}`` is ``{"optimizer": {"lr": {...}}}``)."""
    out = []
    for name, value in table.items():
        path = f"{prefix}{name}"
        if not prefix and name in OPTIONS:
            continue
        if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
            out += _spaces(value, key, path + ".")
        else:
            out.append((path, value))
    return out


def _dimension(path: str, space: Any, key: str) -> Dimension:
    where = f"{key}.{path}"
    if not isinstance(space, Mapping) or len(space) != 1 or next(iter(space)) not in SPACES:
        raise ConfigError(
            f"{where} must be one space: {{ log = [low, high] }}, {{ one_minus_log = [low, high] }} "
            f"or {{ uniform = [low, high] }}, got {space!r}"
        )
    kind, bounds = next(iter(space.items()))
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
        or not all(math.isfinite(b) for b in bounds)
    ):
        raise ConfigError(f"{where}.{kind} must be [low, high], two finite numbers, got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    if not low < high:
        raise ConfigError(f"{where}.{kind} = {bounds}: low must be below high")
    if kind in ("log", "one_minus_log") and low <= 0:
        raise ConfigError(f"{where}.{kind} = {bounds}: a log space needs 0 < low")
    if kind == "one_minus_log" and high > 1:
        raise ConfigError(f"{where}.one_minus_log = {bounds} bounds 1 − value: high must be at most 1")
    return Dimension(ALIASES.get(path, path), kind, low, high)
