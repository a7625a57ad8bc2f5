"""SGD with the learning rate inside the velocity, and the momentum correction that keeps it
equal to ``torch.optim.SGD`` when the rate changes (Goyal et al. 2017, §2.1).

``torch.optim.SGD`` keeps the rate outside its buffer: u ← μu + g, θ ← θ − ηu. The form
with the rate inside, v ← μv + ηg, θ ← θ − v, is the same update while η is fixed (v = ηu),
but after a change from η_t to η_{t+1} its v still holds η_t·u: the next step then weighs
the past gradients by η_t instead of η_{t+1}. Scaling v by η_{t+1}/η_t first (momentum
correction) restores v = η_{t+1}·u, and the two forms are one again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch


class VelocitySGD(torch.optim.Optimizer):
    """SGD with momentum μ, the rate η inside the velocity v:

    d = g + λθ (weight decay as ``torch.optim.SGD`` adds it); v ← μv + ηd (v = ηd at a
    parameter's first step); θ ← θ − v, or with Nesterov θ ← θ − (μv + ηd).

    With ``correction`` (the default), when a group's ``lr`` differs from the rate of its
    previous step, v is first scaled by η_new/η_old; the update is then that of
    ``torch.optim.SGD`` to float rounding, through any schedule. A step at rate 0 leaves no
    trace of its gradient in v (and scales v to 0), so after one this form parts from
    ``torch.optim.SGD``, whose buffer keeps that gradient: no correction can restore it.

    The rate v was last updated with is kept beside v (state ``velocity_lr``), per
    parameter: a parameter without a gradient at some step (its v untouched, as torch's
    buffer is) is still corrected by the whole change when it next steps, and
    :meth:`state_dict` carries it, so a resumed run corrects its first step as an
    uninterrupted one would.
    """

    elementwise: ClassVar[bool] = True
    """Each element's update reads only its own gradient and state: the simulated engine may
    step stacked replicas with it."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        correction: bool = True,
    ) -> None:
        if lr < 0:
            raise ValueError(f"VelocitySGD: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"VelocitySGD: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"VelocitySGD: weight_decay must be >= 0, got {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("VelocitySGD: nesterov needs momentum > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "correction": correction,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    @staticmethod
    def correction_factor(last: float, lr: float, correction: bool) -> float:
        """η_new/η_old when the rate changed since v was last updated and the correction is
        on; 1 otherwise (no change, or a previous rate of 0, whose velocity is 0 already)."""
        if not correction or last == lr or last == 0:
            return 1.0
        return lr / last

    def _step_group(self, group: dict[str, Any]) -> None:
        lr = float(group["lr"])
        mu = group["momentum"]
        decay = group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=decay) if decay else p.grad
            if mu == 0:
                p.add_(d, alpha=-lr)
                continue
            state = self.state[p]
            v = state.get("velocity")
            if v is None:
                v = state["velocity"] = torch.mul(d, lr)
            else:
                # μ·(η_new/η_old)·v in one multiply: the correction costs no pass of its own.
                carry = mu * self.correction_factor(state["velocity_lr"], lr, group["correction"])
                v.mul_(carry).add_(d, alpha=lr)
            state["velocity_lr"] = lr
            if group["nesterov"]:
                p.sub_(torch.mul(d, lr).add_(v, alpha=mu))
            else:
                p.sub_(v)
