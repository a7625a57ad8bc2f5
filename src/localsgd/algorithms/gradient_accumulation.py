"""Gradient accumulation: one update every ``steps`` micro-batches, averaged over all workers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from localsgd.algorithms._common import ParametersAlwaysInSync, clone_all
from localsgd.algorithms.base import AlgorithmConfig, SyncContext, load_tensors, register, require_keys
from localsgd.comm.base import WORLD
from localsgd.util.checks import check_int


@register("gradient_accumulation")
@dataclass(frozen=True)
class GradientAccumulation(AlgorithmConfig):
    """The loop calls ``optimizer.step()`` after every micro-batch; the update is applied on
    every ``steps``-th call, with the gradient averaged over those micro-batches and over
    all workers: mini-batch SGD at a global batch ``steps`` times larger, with one
    collective per update.

    Consistency: parameters are identical on every replica after every applied update.
    On the calls in between the optimizer sees no gradients, so it leaves every parameter
    (and its momentum, weight decay, step count) untouched.
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"steps": "k"}
    SHARDED_PARAMETERS: ClassVar[bool] = False  # it swaps parameters' .grad tensors

    steps: int = 2
    """Micro-batches per applied update (k). 1 is mini-batch SGD."""

    @property
    def sync_period(self) -> int:
        return 1

    def __post_init__(self) -> None:
        check_int("gradient_accumulation.steps", self.steps, 1)

    def planned_syncs(self, steps: int) -> dict[str, int]:
        return {"world": steps // self.steps}

    def bind(self, ctx: SyncContext) -> AccumulationSync:
        return AccumulationSync(self, ctx)


class AccumulationSync(ParametersAlwaysInSync):
    def __init__(self, config: GradientAccumulation, ctx: SyncContext) -> None:
        self.config = config
        self.ctx = ctx
        self.syncs = 0
        self.micro = 0
        self.accumulated: list[torch.Tensor] | None = None

    def before_step(self) -> None:
        ctx = self.ctx
        if self.accumulated is None:
            self.accumulated = [torch.zeros_like(p) for p in ctx.params]
        grads = [p.grad for p in ctx.params]
        present = [(a, g) for a, g in zip(self.accumulated, grads) if g is not None]
        if present:
            torch._foreach_add_([a for a, _ in present], [g for _, g in present])
        self.micro += 1
        if self.micro < self.config.steps:
            # Parameters without a gradient are skipped by every torch optimizer.
            for p in ctx.params:
                p.grad = None
            return
        torch._foreach_mul_(self.accumulated, 1.0 / self.config.steps)
        ctx.comm.average(self.accumulated, WORLD)
        for p, g in zip(ctx.params, self.accumulated):
            p.grad = g
        self.accumulated = None
        self.micro = 0
        self.syncs += 1

    def skipped_step(self) -> None:
        """An overflowed micro-batch counts as one with its gradient left out; when it is
        the k-th, the update it would have applied is dropped with what was accumulated
        (every rank skipped it, so no rank averages)."""
        self.micro += 1
        if self.micro == self.config.steps:
            self.accumulated = None
            self.micro = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "syncs": self.syncs,
            "micro": self.micro,
            "accumulated": None if self.accumulated is None else clone_all(self.accumulated),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        require_keys(state, ["syncs", "micro", "accumulated"], "gradient_accumulation")
        self.syncs = int(state["syncs"])
        self.micro = int(state["micro"])
        if state["accumulated"] is None:
            self.accumulated = None
        else:
            self.accumulated = [torch.zeros_like(p) for p in self.ctx.params]
            load_tensors("accumulated", self.accumulated, state["accumulated"])
