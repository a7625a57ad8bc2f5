"""Outer optimizers on the averaged update: SlowMo and DiLoCo.

Both keep an anchor x_0 (the model at the last sync, identical everywhere) and, after the
replicas are averaged into x̄, take one momentum step on the pseudo-gradient:

    g = (x_0 - x̄) / s          u ← β·u + g          d = g + β·u (Nesterov) or u
    x_0 ← x_0 - α·s·d           every replica ← x_0

SlowMo scales by the inner learning rate, s = γ_t (Wang et al. 2020, Algorithm 1); DiLoCo
uses s = 1 (Douillard et al. 2023). With β = 0 and α = 1 either reduces to local SGD.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from localsgd.algorithms._common import (
    ModelAverager,
    clone_all,
    load_tensors,
    lr_of,
    require_keys,
)
from localsgd.algorithms.base import AlgorithmConfig, SyncContext, register
from localsgd.algorithms.local_sgd import LocalSGDSync, check_local_options
from localsgd.util.checks import check_bool, check_float, check_int


class OuterMomentum:
    """The outer step above; runs right after the replicas were averaged."""

    def __init__(
        self, ctx: SyncContext, lr: float, momentum: float, nesterov: bool, scale_by_lr: bool
    ) -> None:
        self.ctx = ctx
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.scale_by_lr = scale_by_lr
        self.anchor = clone_all(ctx.params)
        self.buffer = [torch.zeros_like(p) for p in ctx.params]

    def _scales(self) -> dict[float, list[int]]:
        """Parameter indices grouped by their scale s (the inner lr, or 1)."""
        groups: dict[float, list[int]] = {}
        lrs = lr_of(self.ctx) if self.scale_by_lr else {}
        for i, p in enumerate(self.ctx.params):
            groups.setdefault(lrs.get(id(p), 1.0), []).append(i)
        return groups

    @torch.no_grad()
    def apply(self, *, commit: bool = True) -> None:
        """The outer step from the averaged parameters in place. ``commit=False`` writes the
        resulting model into the parameters but leaves x_0 and u untouched (to evaluate
        the model a sync would produce now)."""
        params = self.ctx.params
        for s, idx in self._scales().items():
            if s == 0:
                # A zero inner learning rate moved nothing; the outer step α·γ·u is 0 too.
                torch._foreach_copy_([params[i] for i in idx], [self.anchor[i] for i in idx])
                continue
            x0 = [self.anchor[i] if commit else self.anchor[i].clone() for i in idx]
            u = [self.buffer[i] if commit else self.buffer[i].clone() for i in idx]
            g = list(torch._foreach_sub(x0, [params[i] for i in idx]))
            if s != 1.0:
                torch._foreach_div_(g, s)
            torch._foreach_mul_(u, self.momentum)
            torch._foreach_add_(u, g)
            if self.nesterov:
                torch._foreach_add_(g, u, alpha=self.momentum)
                d = g
            else:
                d = u
            torch._foreach_add_(x0, d, alpha=-self.lr * s)
            torch._foreach_copy_([params[i] for i in idx], x0)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": clone_all(self.anchor), "momentum_buffer": clone_all(self.buffer)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        require_keys(state, ["anchor", "momentum_buffer"], "outer optimizer")
        load_tensors("anchor", self.anchor, state["anchor"])
        load_tensors("momentum_buffer", self.buffer, state["momentum_buffer"])


@register("slowmo")
@dataclass(frozen=True)
class SlowMo(AlgorithmConfig):
    """Local SGD with slow momentum: every H steps the averaged update (x_0 - x̄)/γ feeds a
    momentum buffer u ← βu + (x_0 - x̄)/γ and the model moves x_0 ← x_0 - αγu (α =
    ``outer_lr``, β = ``outer_momentum``, the names DiLoCo's fields use too), γ being
    the inner optimizer's current learning rate (Wang et al. 2020, "SlowMo").

    Consistency: parameters identical on every replica right after each sync.
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"period": "H", "outer_momentum": "β", "outer_lr": "α"}
    READS_INNER_LR: ClassVar[bool] = True
    RENAMED: ClassVar[dict[str, str]] = {"lr": "outer_lr", "momentum": "outer_momentum"}

    period: int = 8
    """H (τ in the paper): local steps between two outer steps."""
    outer_momentum: float = 0.5
    """β: slow momentum, in [0, 1)."""
    outer_lr: float = 1.0
    """α: slow learning rate, > 0."""
    nesterov: bool = False
    """Use Nesterov's form of the slow momentum step."""
    average_buffers: bool = True
    """Average floating-point buffers (BatchNorm statistics) at each sync too."""
    optimizer_state: str = "local"
    """Inner optimizer state at a sync: ``local``, ``average`` or ``reset``."""

    def __post_init__(self) -> None:
        check_int("slowmo.period", self.period, 1)
        check_float("slowmo.outer_momentum", self.outer_momentum, 0.0, 1.0)
        check_float("slowmo.outer_lr", self.outer_lr, 0.0, None, low_open=True)
        check_bool("slowmo.nesterov", self.nesterov)
        check_local_options("slowmo", self.average_buffers, self.optimizer_state)

    @property
    def sync_period(self) -> int:
        return self.period

    def bind(self, ctx: SyncContext) -> LocalSGDSync:
        outer = OuterMomentum(ctx, self.outer_lr, self.outer_momentum, self.nesterov, scale_by_lr=True)
        averager = ModelAverager(ctx, self.average_buffers, self.optimizer_state)
        return LocalSGDSync(ctx, self.period, averager, outer)


@register("diloco")
@dataclass(frozen=True)
class DiLoCo(AlgorithmConfig):
    """Every H steps the pseudo-gradient x_0 - x̄ drives an outer Nesterov SGD step on the
    anchor x_0 (Douillard et al. 2023, "DiLoCo"); the inner optimizer is whatever the
    loop uses (AdamW in the paper).

    Consistency: parameters identical on every replica right after each outer step.
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"period": "H", "outer_lr": "η", "outer_momentum": "μ"}

    period: int = 500
    """H: inner steps between two outer steps."""
    outer_lr: float = 0.7
    """η: outer learning rate, > 0."""
    outer_momentum: float = 0.9
    """μ: outer Nesterov momentum, in [0, 1)."""
    nesterov: bool = True
    """Nesterov's form of the outer momentum, as in the paper."""
    average_buffers: bool = True
    """Average floating-point buffers (BatchNorm statistics) at each sync too."""
    optimizer_state: str = "local"
    """Inner optimizer state at a sync: ``local`` (the paper), ``average`` or ``reset``."""

    def __post_init__(self) -> None:
        check_int("diloco.period", self.period, 1)
        check_float("diloco.outer_lr", self.outer_lr, 0.0, None, low_open=True)
        check_float("diloco.outer_momentum", self.outer_momentum, 0.0, 1.0)
        check_bool("diloco.nesterov", self.nesterov)
        check_local_options("diloco", self.average_buffers, self.optimizer_state)

    @property
    def sync_period(self) -> int:
        return self.period

    def bind(self, ctx: SyncContext) -> LocalSGDSync:
        outer = OuterMomentum(ctx, self.outer_lr, self.outer_momentum, self.nesterov, scale_by_lr=False)
        averager = ModelAverager(ctx, self.average_buffers, self.optimizer_state)
        return LocalSGDSync(ctx, self.period, averager, outer)
