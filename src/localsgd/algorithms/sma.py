"""Crossbow's synchronous model averaging (SMA)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from localsgd.algorithms._common import average_model, clone_all
from localsgd.algorithms.base import AlgorithmConfig, SyncContext, load_tensors, register, require_keys
from localsgd.comm.base import WORLD
from localsgd.util.checks import check_float


@register("sma")
@dataclass(frozen=True)
class SMA(AlgorithmConfig):
    """Every step each learner is pulled toward a central model z, and z follows the
    learners with momentum (Koliousis et al. 2019, "Crossbow", Algorithm 1):

        c_j = λ·(w_j - z)                  (w_j before this step's update)
        w_j ← w_j - γ∇f_j(w_j) - c_j       (the gradient part is the user's optimizer)
        z   ← z + Σ_j c_j + μ·(z - z_prev)

    λ = ``alpha`` is the paper's α (docs/algorithms.md keeps α for link latency).

    Consistency: learners stay different; z is identical everywhere and is the consensus
    model (what evaluation sees and what ``DataParallel`` leaves on exit). One collective
    per dtype per step.
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"alpha": "λ", "momentum": "μ"}

    alpha: float | None = None
    """λ (the paper's α): strength of the correction toward z, in (0, 1]; None means 1/K for K workers."""
    momentum: float = 0.9
    """μ: momentum of the central model, in [0, 1)."""

    def __post_init__(self) -> None:
        if self.alpha is not None:
            check_float("sma.alpha", self.alpha, 0.0, 1.0, low_open=True, high_open=False)
        check_float("sma.momentum", self.momentum, 0.0, 1.0)

    def label(self, shown: Mapping[str, str] | None = None, omit: Collection[str] = ()) -> str:
        return super().label(shown, omit).replace("λ=None", "λ=1/K")

    def planned_syncs(self, steps: int) -> dict[str, int]:
        return {"world": steps}

    def bind(self, ctx: SyncContext) -> SMASync:
        return SMASync(self, ctx)


class SMASync:
    def __init__(self, config: SMA, ctx: SyncContext) -> None:
        self.ctx = ctx
        self.alpha = 1.0 / ctx.comm.world_size if config.alpha is None else config.alpha
        self.momentum = config.momentum
        self.central = clone_all(ctx.params)
        self.central_prev = clone_all(ctx.params)
        self.correction: list[torch.Tensor] | None = None
        self.syncs = 0

    @torch.no_grad()
    def before_step(self) -> None:
        # d_j = w_j - z, taken before the optimizer moves w_j.
        self.correction = list(torch._foreach_sub(self.ctx.params, self.central))

    def skipped_step(self) -> None:
        """No update from the optimizer; the elastic step and its averaging still happen."""
        self.before_step()
        self.after_step()

    @torch.no_grad()
    def after_step(self) -> None:
        assert self.correction is not None, "SMA.after_step ran without before_step"
        d = self.correction
        self.correction = None
        torch._foreach_add_(self.ctx.params, d, alpha=-self.alpha)
        self.ctx.comm.average(d, WORLD)  # now mean_j(w_j - z)
        # z_new = z + K·λ·mean(d) + μ·(z - z_prev)
        k = self.ctx.comm.world_size
        step = torch._foreach_sub(self.central, self.central_prev)
        torch._foreach_mul_(step, self.momentum)
        torch._foreach_add_(step, d, alpha=k * self.alpha)
        torch._foreach_copy_(self.central_prev, self.central)
        torch._foreach_add_(self.central, step)
        self.syncs += 1

    @torch.no_grad()
    def write_consensus(self, *, record: bool) -> None:
        torch._foreach_copy_(self.ctx.params, self.central)
        average_model(self.ctx, params=False, buffers=True, record=record)

    def finalize(self) -> None:
        self.write_consensus(record=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "syncs": self.syncs,
            "central": clone_all(self.central),
            "central_prev": clone_all(self.central_prev),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        require_keys(state, ["syncs", "central", "central_prev"], "sma")
        self.syncs = int(state["syncs"])
        load_tensors("central", self.central, state["central"])
        load_tensors("central_prev", self.central_prev, state["central_prev"])
