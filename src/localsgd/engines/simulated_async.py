"""Asynchrony in the simulated engine: per-worker speeds, and the order in which replicas
reach a parameter server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from localsgd.util.checks import ConfigError, check_float, from_dict


@dataclass(frozen=True)
class SimulatedOptions:
    """``[engine_options]`` of a simulated run: how fast each simulated worker is."""

    worker_speeds: tuple[float, ...] = ()
    """Steps per unit of time of each of the K workers (K values > 0); empty: all 1."""
    speed_spread: float = 0.0
    """σ of log-normal worker speeds drawn from the run's seed (heterogeneous hardware);
    0: all 1. Not together with ``worker_speeds``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "worker_speeds", tuple(self.worker_speeds))
        for i, speed in enumerate(self.worker_speeds):
            check_float(f"engine_options.worker_speeds[{i}]", speed, 0.0, None, low_open=True)
        check_float("engine_options.speed_spread", self.speed_spread, 0.0, 10.0)
        if self.worker_speeds and self.speed_spread:
            raise ConfigError("give engine_options.worker_speeds or engine_options.speed_spread, not both")


def simulated_options(raw: Mapping[str, Any] | None, workers: int | None = None) -> SimulatedOptions:
    options = from_dict(SimulatedOptions, dict(raw or {}), "engine_options")
    if workers is not None and options.worker_speeds and len(options.worker_speeds) != workers:
        raise ConfigError(
            f"engine_options.worker_speeds has {len(options.worker_speeds)} values; "
            f"it needs one per worker (workers = {workers})"
        )
    return options
