"""Your own model and data in a localsgd study: a small nonlinear regression.

A workload is any object with the members below (the ``localsgd.workloads.Workload``
contract): batches are dicts of tensors, the workload computes the loss from ``(model,
batch)``, and it declares its metrics, here R² (primary, higher is better) and the eval
mean squared error. A study names it by import path::

    [base.workload]
    name = "examples.own_workload:make_workload"   # importable from the current directory
    num_samples = 4096                             # RegressionConfig's fields

    localsgd study examples/own_run.toml           # from the repository root
    localsgd report studies_out/own_regression
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from localsgd.workloads import Metric, shard_indices


@dataclass(frozen=True)
class RegressionConfig:
    """The workload's own config section (``[workload]``): checked when the config loads."""

    num_samples: int = 4096
    """Samples generated: 80 % train, 20 % evaluation."""
    features: int = 16
    """Input dimension."""
    noise: float = 0.1
    """Standard deviation of the noise added to the targets."""
    data_seed: int = 0
    """Seed of the generated data set (model init and data order take the run's seed)."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_samples, int) or not 100 <= self.num_samples <= 10**7:
            raise ValueError(
                f"workload.num_samples must be an integer in [100, 10000000], got {self.num_samples!r}"
            )
        if not isinstance(self.features, int) or not 1 <= self.features <= 4096:
            raise ValueError(f"workload.features must be an integer in [1, 4096], got {self.features!r}")
        if not 0 <= self.noise < 10:
            raise ValueError(f"workload.noise must be a number in [0, 10), got {self.noise!r}")


class Regression:
    """y = sin(x·w₁)·w₂ + noise; a two-layer MLP learns it under mean squared error."""

    metrics = (
        Metric("r2", label="R²", higher_is_better=True),
        Metric("eval_mse", label="eval MSE", higher_is_better=False),
    )
    primary = "r2"

    def __init__(self, config: RegressionConfig) -> None:
        self.options = config
        generator = torch.Generator().manual_seed(config.data_seed)
        x = torch.randn(config.num_samples, config.features, generator=generator)
        w1 = torch.randn(config.features, 8, generator=generator) / config.features**0.5
        w2 = torch.randn(8, generator=generator)
        y = torch.sin(2 * x @ w1) @ w2 + config.noise * torch.randn(config.num_samples, generator=generator)
        split = int(0.8 * config.num_samples)
        self.train = {"features": x[:split], "target": y[:split]}
        self.eval = {"features": x[split:], "target": y[split:]}

    @property
    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    @property
    def train_size(self) -> int:
        return len(self.train["target"])

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(self.options.features, 64), nn.Tanh(), nn.Linear(64, 1))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch["features"]).squeeze(-1), batch["target"])

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        per_rank = self.train_size // world_size
        if batch_size > per_rank:
            raise ValueError(f"batch_size must be <= {per_rank} for {world_size} workers, got {batch_size}")
        return per_rank // batch_size

    def train_batches(
        self, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, device: Any
    ) -> Iterator[dict[str, torch.Tensor]]:
        # Disjoint shards from (seed, epoch) alone: the same on every engine.
        order = shard_indices(self.train_size, rank, world_size, epoch, seed)
        steps = self.steps_per_epoch(world_size, batch_size)
        for idx in order[: steps * batch_size].split(batch_size):
            yield {k: v[idx].to(device) for k, v in self.train.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: Any) -> dict[str, float]:
        x, y = self.eval["features"].to(device), self.eval["target"].to(device)
        mse = F.mse_loss(model(x).squeeze(-1), y).item()
        return {"r2": 1.0 - mse / y.var(unbiased=False).item(), "eval_mse": mse}


def make_workload(config: RegressionConfig) -> Regression:
    """The factory a config names: ``workload = "examples.own_workload:make_workload"``."""
    return Regression(config)
