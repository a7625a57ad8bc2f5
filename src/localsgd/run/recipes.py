"""Training recipes: the inner optimizer and the learning rate over steps.

The learning rate follows the large-batch recipes that local SGD is compared against: the
linear scaling rule (lr = base lr × global batch / base batch) and warmup over W epochs
(Goyal et al. 2017: gradual, a linear rise from the base rate to the scaled one; or
constant, the base rate for W epochs and then the scaled one), then a decay schedule; or
the fine-tuning recipe of transformers: AdamW, linear warmup from 0 over ``warmup_steps``
(or ``warmup_ratio`` of training), then linear decay to 0 (``schedule.name = "linear"``).

A warmup only ever rises: it starts at or below the peak and ends on it (:func:`plan_warmup`);
a warmup from the base rate to a scaled rate that is not above it is not taken, and the
run record says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from localsgd.run.config import OptimizerConfig, ScheduleConfig
from localsgd.run.optimizers import VelocitySGD


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, ndim: Callable[[torch.Tensor], int] | None = None
) -> torch.optim.Optimizer:
    """SGD (``torch.optim.SGD``, or :class:`VelocitySGD` for ``momentum_form =
    "lr_inside"``) or AdamW over the model's trainable parameters; with ``decay_norm_and_bias``
    false, parameters of at most one dimension (biases, norm scales) get no weight decay.
    ``ndim`` gives a parameter's own dimensions when it is stacked over replicas."""
    params = [p for p in model.parameters() if p.requires_grad]
    dims = ndim or (lambda p: p.ndim)
    if config.decay_norm_and_bias or config.weight_decay == 0:
        groups: list[dict] = [{"params": params, "weight_decay": config.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if dims(p) > 1], "weight_decay": config.weight_decay},
            {"params": [p for p in params if dims(p) <= 1], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
    if config.name == "sgd" and config.momentum_form == "lr_inside":
        return VelocitySGD(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            correction=config.momentum_correction,
        )
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)


def _half_cosine(p: float) -> float:
    return 1.0 if p < 0.5 else 0.5 * (1.0 + math.cos(math.pi * (p - 0.5) / 0.5))


# Decay factor by schedule name, from the fraction of training done.
DECAYS: dict[str, Callable[[float, ScheduleConfig], float]] = {
    "constant": lambda p, s: 1.0,
    "step": lambda p, s: s.gamma ** sum(1 for m in s.milestones if p >= m),
    "cosine": lambda p, s: 0.5 * (1.0 + math.cos(math.pi * p)),
    "half_cosine": lambda p, s: _half_cosine(p),
}


def peak_lr(base_lr: float, schedule: ScheduleConfig, global_batch: int) -> float:
    """The rate after warmup: scaled by the linear scaling rule when it is on."""
    if schedule.linear_scaling:
        return base_lr * global_batch / schedule.base_batch
    return base_lr


@dataclass(frozen=True)
class Warmup:
    """A run's warmup, resolved from its schedule and size: ``steps`` steps from
    ``start_lr`` up to ``peak_lr`` (``start_lr`` ≤ ``peak_lr`` always), rising linearly
    (``gradual``) or held at ``start_lr`` (``constant``); ``note`` says what was done and
    why, for the run record."""

    steps: int
    start_lr: float
    peak_lr: float
    kind: str
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_lr": self.peak_lr,
            "warmup_steps": self.steps,
            "warmup_start_lr": self.start_lr,
            "warmup": self.kind if self.steps else "none",
            "note": self.note,
        }


def warmup_steps(schedule: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> int:
    """Steps of the warmup the schedule asks for: ``warmup_epochs`` × the steps per epoch,
    ``warmup_steps``, or ``warmup_ratio`` of the training steps rounded up (as transformers
    does)."""
    if schedule.warmup_epochs:
        return round(schedule.warmup_epochs * steps_per_epoch)
    if schedule.warmup_steps:
        return schedule.warmup_steps
    return math.ceil(schedule.warmup_ratio * total_steps)


def plan_warmup(
    schedule: ScheduleConfig, total_steps: int, steps_per_epoch: int, base_lr: float, global_batch: int
) -> Warmup:
    """The warmup of a run (see :class:`Warmup`). It starts at ``schedule.warmup_start``:
    ``"base"``, the base rate ``optimizer.lr`` (Goyal et al. 2017: from η to kη; the
    default of ``warmup_epochs``), or a fraction of the peak (0: from 0, the default of
    ``warmup_steps`` and ``warmup_ratio``). A warmup from the base rate when the scaled
    peak is not above it (k = global batch / base batch ≤ 1, or no scaling) has nothing to
    rise to: the run takes none, and ``note`` says so."""
    peak = peak_lr(base_lr, schedule, global_batch)
    steps = warmup_steps(schedule, total_steps, steps_per_epoch)
    start = schedule.start_of_warmup()
    if steps == 0:
        return Warmup(0, peak, peak, schedule.warmup, "no warmup asked for")
    if start == "base":
        if peak <= base_lr:
            k = global_batch / schedule.base_batch if schedule.linear_scaling else 1.0
            return Warmup(
                0,
                peak,
                peak,
                schedule.warmup,
                f"no warmup needed: the peak rate {peak:.6g} is not above the base rate {base_lr:.6g} "
                f"(k = {k:.6g}), so a warmup from the base rate would fall, not rise",
            )
        start_lr, origin = base_lr, "the base rate"
    else:
        start_lr, origin = float(start) * peak, f"{float(start):g} × the peak"
    how = "held at" if schedule.warmup == "constant" else "rising linearly from"
    return Warmup(
        steps,
        start_lr,
        peak,
        schedule.warmup,
        f"{schedule.warmup} warmup over {steps} steps, {how} {origin} {start_lr:.6g} to the peak {peak:.6g}",
    )


def lr_at(
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    base_lr: float,
    schedule: ScheduleConfig,
    global_batch: int,
) -> float:
    """The learning rate for 0-based ``step`` of ``total_steps``: the warmup of
    :func:`plan_warmup`, then the named schedule from the peak. ``cosine``,
    ``half_cosine`` and ``linear`` decay over the steps after the warmup (the peak at its
    end, 0 at the end of training); ``step``'s milestones are fractions of the whole
    training (Goyal et al.'s decays at epochs 30, 60 and 80 of 90 count the warmup)."""
    warm = plan_warmup(schedule, total_steps, steps_per_epoch, base_lr, global_batch)
    if step < warm.steps:
        if warm.kind == "constant":
            return warm.start_lr
        return warm.start_lr + (warm.peak_lr - warm.start_lr) * step / warm.steps
    if schedule.name == "step":
        progress = step / max(total_steps, 1)
    else:
        progress = (step - warm.steps) / max(total_steps - warm.steps, 1)
    if schedule.name == "linear":
        # transformers' get_linear_schedule_with_warmup: 1 at the end of the warmup, 0 at the end.
        return warm.peak_lr * max(0.0, 1.0 - progress)
    return warm.peak_lr * DECAYS[schedule.name](progress, schedule)
