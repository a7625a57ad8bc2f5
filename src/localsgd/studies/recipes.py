"""Training recipes: the inner optimizer and the learning rate over steps.

The learning rate follows the large-batch recipes that local SGD is compared against: the
linear scaling rule (lr = base lr × global batch / base batch) and warmup over W epochs
(Goyal et al. 2017: gradual, a linear rise from the base rate to the scaled one; or
constant, the base rate for W epochs and then the scaled one), then a decay schedule; or
the fine-tuning recipe of transformers: AdamW, linear warmup from 0 over ``warmup_steps``
(or ``warmup_ratio`` of training), then linear decay to 0 (``schedule.name = "linear"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from localsgd.studies.schema import OptimizerConfig, ScheduleConfig


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, ndim: Callable[[torch.Tensor], int] | None = None
) -> torch.optim.Optimizer:
    """SGD or AdamW over the model's trainable parameters; with ``decay_norm_and_bias``
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


def lr_at(
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    base_lr: float,
    schedule: ScheduleConfig,
    global_batch: int,
) -> float:
    """The learning rate for 0-based ``step`` of ``total_steps``."""
    peak = peak_lr(base_lr, schedule, global_batch)
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    if step < warmup:
        if schedule.warmup == "constant":
            return base_lr
        return base_lr + (peak - base_lr) * step / warmup
    ramp = warmup_from_zero(schedule, total_steps)
    if step < ramp:
        return peak * step / ramp
    if schedule.name == "linear":
        # transformers' get_linear_schedule_with_warmup: 1 at the end of the warmup, 0 at the end.
        return peak * max(0.0, (total_steps - step) / max(total_steps - max(ramp, warmup), 1))
    progress = step / max(total_steps, 1)
    return peak * DECAYS[schedule.name](progress, schedule)


def warmup_from_zero(schedule: ScheduleConfig, total_steps: int) -> int:
    """Steps of the transformers-style warmup (``warmup_steps``, or ``warmup_ratio`` of the
    training steps rounded up, as transformers does)."""
    if schedule.warmup_steps:
        return schedule.warmup_steps
    return math.ceil(schedule.warmup_ratio * total_steps)
