"""Outer optimizers on the averaged update: SlowMo and DiLoCo.

Both keep an anchor x_0 (the model at the last sync, identical everywhere) and, after the
replicas are averaged into x̄, take one momentum step on the pseudo-gradient:

    g = (x_0 - x̄) / s          u ← μ·u + g          d = g + μ·u (Nesterov) or u
    x_0 ← x_0 - η·s·d           every replica ← x_0

with η = ``outer_lr`` and μ = ``outer_momentum`` (the symbols of docs/algorithms.md's
table; SlowMo's paper writes α and β).

SlowMo scales by the inner learning rate, s = γ_t (Wang et al. 2020, Algorithm 1); DiLoCo
uses s = 1 (Douillard et al. 2023). With μ = 0 and η = 1 either reduces to local SGD.

With a switch step t' > 0 either runs as post-local SGD does (Lin et al. 2020): mini-batch
SGD for the steps t < t', then outer steps from x_0 = the model at t' with u = 0 (Ortiz
et al. 2021 apply slow momentum after post-local SGD's switch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from localsgd.algorithms._common import clone_all, lr_of
from localsgd.algorithms.base import AlgorithmConfig, SyncContext, load_tensors, register, require_keys
from localsgd.algorithms.local_sgd import LocalSGDSync, check_local_options, periodic_sync
from localsgd.algorithms.post_local_sgd import SwitchedSync
from localsgd.algorithms.streaming import (
    StreamingSync,
    check_streaming,
    refuse_compressed,
    streaming_options,
    switched_syncs,
)
from localsgd.comm.codecs import NO_COMPRESSION, Compression, resolve
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
        for idx, x0 in self.step(range(len(params)), params, commit=commit):
            torch._foreach_copy_([params[i] for i in idx], x0)

    @torch.no_grad()
    def step(
        self,
        indices: Iterable[int],
        averaged: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
        *,
        commit: bool = True,
    ) -> list[tuple[list[int], list[torch.Tensor]]]:
        """The outer step of the parameters at ``indices`` (into ``ctx.params``) from their
        averages x̄ (``averaged[i]``): the new models x_0, as (indices, tensors) per scale
        s. A fragment of the model steps alone this way (streaming synchronization)."""
        wanted = set(indices)
        out = []
        for s, every in self._scales().items():
            idx = [i for i in every if i in wanted]
            if not idx:
                continue
            if s == 0:
                # A zero inner learning rate moved nothing; the outer step η·γ·u is 0 too.
                out.append((idx, [self.anchor[i] for i in idx]))
                continue
            x0 = [self.anchor[i] if commit else self.anchor[i].clone() for i in idx]
            u = [self.buffer[i] if commit else self.buffer[i].clone() for i in idx]
            g = list(torch._foreach_sub(x0, [averaged[i] for i in idx]))
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
            out.append((idx, x0))
        return out

    @torch.no_grad()
    def restart(self) -> None:
        """x_0 ← the current parameters, u ← 0 (outer steps begin here)."""
        torch._foreach_copy_(self.anchor, self.ctx.params)
        for u in self.buffer:
            u.zero_()

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
    momentum buffer u ← μu + (x_0 - x̄)/γ and the model moves x_0 ← x_0 - ηγu (η =
    ``outer_lr``, μ = ``outer_momentum``, as for DiLoCo; the paper's α and β), γ being
    the inner optimizer's current learning rate (Wang et al. 2020, "SlowMo").

    With ``switch_step`` t' > 0, mini-batch SGD comes first and slow momentum starts at t'
    from that model (post-local SGD with SlowMo, Ortiz et al. 2021).

    Consistency: parameters identical on every replica after every step before t', and
    right after each sync from then on.
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"period": "H", "outer_momentum": "μ", "outer_lr": "η"}
    OPTIONAL_SYMBOLS: ClassVar[dict[str, str]] = {"switch_step": "t'"}
    READS_INNER_LR: ClassVar[bool] = True
    RENAMED: ClassVar[dict[str, str]] = {"lr": "outer_lr", "momentum": "outer_momentum"}

    period: int = 8
    """H (τ in the paper): local steps between two outer steps."""
    outer_momentum: float = 0.5
    """μ (the paper's β): slow momentum, in [0, 1)."""
    outer_lr: float = 1.0
    """η (the paper's α): slow learning rate, > 0."""
    nesterov: bool = False
    """Use Nesterov's form of the slow momentum step."""
    average_buffers: bool = True
    """Average floating-point buffers (BatchNorm statistics) at each sync too."""
    optimizer_state: str = "local"
    """Inner optimizer state at a sync: ``local``, ``average`` or ``reset``."""
    switch_step: int = 0
    """t': steps t < t' average gradients (mini-batch SGD); outer steps start from the model
    at t' (0-based), with the slow momentum at zero. 0 is SlowMo from the start."""
    fragments: int = 1
    """F: fragments streamed at their own offsets in the period (:mod:`~localsgd.algorithms.streaming`)."""
    overlap: int = 0
    """τ: steps a fragment's pseudo-gradient is in flight before its outer step; τ <= H/F."""
    mixing: float = 0.0
    """α: the outer step's result θ̃ lands as (1 − α)·θ̃ + α·θ_local, in [0, 1)."""
    compression: Compression | Mapping[str, Any] = NO_COMPRESSION
    """What crosses the wire: the pseudo-gradient x_0 − x_k, as ``{codec = "int8", block =
    256, ratio = 0.01, error_feedback = true}`` (gradients before t'; see
    :mod:`localsgd.comm.codecs`); ``none`` sends it exactly."""

    def __post_init__(self) -> None:
        check_int("slowmo.period", self.period, 1)
        check_int("slowmo.switch_step", self.switch_step, 0)
        check_float("slowmo.outer_momentum", self.outer_momentum, 0.0, 1.0)
        check_float("slowmo.outer_lr", self.outer_lr, 0.0, None, low_open=True)
        check_bool("slowmo.nesterov", self.nesterov)
        check_local_options("slowmo", self.average_buffers, self.optimizer_state)
        streaming = check_streaming(
            "slowmo", self.fragments, self.overlap, self.mixing, self.period, "slowmo.period", self.optimizer_state
        )
        object.__setattr__(self, "compression", resolve("slowmo", self.compression))
        refuse_compressed("slowmo", streaming, self.compression)

    @property
    def sync_period(self) -> int:
        return self.period

    def planned_syncs(self, steps: int) -> dict[str, int]:
        return switched_syncs(steps, self.switch_step, self.period, streaming_options(self))

    def bind(self, ctx: SyncContext) -> LocalSGDSync | StreamingSync | SwitchedSync:
        outer = OuterMomentum(ctx, self.outer_lr, self.outer_momentum, self.nesterov, scale_by_lr=True)
        return after_switch(self, ctx, outer)


@register("diloco")
@dataclass(frozen=True)
class DiLoCo(AlgorithmConfig):
    """Every H steps the pseudo-gradient x_0 - x̄ drives an outer Nesterov SGD step on the
    anchor x_0 (Douillard et al. 2023, "DiLoCo"); the inner optimizer is whatever the
    loop uses (AdamW in the paper).

    With ``switch_step`` t' > 0, mini-batch SGD comes first and the outer steps start at t'
    from that model.

    Consistency: parameters identical on every replica after every step before t', and
    right after each outer step from then on.
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"period": "H", "outer_lr": "η", "outer_momentum": "μ"}
    OPTIONAL_SYMBOLS: ClassVar[dict[str, str]] = {"switch_step": "t'"}

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
    switch_step: int = 0
    """t': steps t < t' average gradients (mini-batch SGD); outer steps start from the model
    at t' (0-based), with the outer momentum at zero. 0 is DiLoCo from the start."""
    fragments: int = 1
    """F: fragments streamed at their own offsets in the period (Streaming DiLoCo's
    fragments; :mod:`~localsgd.algorithms.streaming`)."""
    overlap: int = 0
    """τ: steps a fragment's pseudo-gradient is in flight before its outer step; τ <= H/F."""
    mixing: float = 0.0
    """α: the outer step's result θ̃ lands as (1 − α)·θ̃ + α·θ_local, in [0, 1)."""
    compression: Compression | Mapping[str, Any] = NO_COMPRESSION
    """What crosses the wire: the pseudo-gradient x_0 − x_k, as ``{codec = "int8", block =
    256, ratio = 0.01, error_feedback = true}`` (gradients before t'; see
    :mod:`localsgd.comm.codecs`); ``none`` sends it exactly."""

    def __post_init__(self) -> None:
        check_int("diloco.period", self.period, 1)
        check_int("diloco.switch_step", self.switch_step, 0)
        check_float("diloco.outer_lr", self.outer_lr, 0.0, None, low_open=True)
        check_float("diloco.outer_momentum", self.outer_momentum, 0.0, 1.0)
        check_bool("diloco.nesterov", self.nesterov)
        check_local_options("diloco", self.average_buffers, self.optimizer_state)
        streaming = check_streaming(
            "diloco", self.fragments, self.overlap, self.mixing, self.period, "diloco.period", self.optimizer_state
        )
        object.__setattr__(self, "compression", resolve("diloco", self.compression))
        refuse_compressed("diloco", streaming, self.compression)

    @property
    def sync_period(self) -> int:
        return self.period

    def planned_syncs(self, steps: int) -> dict[str, int]:
        return switched_syncs(steps, self.switch_step, self.period, streaming_options(self))

    def bind(self, ctx: SyncContext) -> LocalSGDSync | StreamingSync | SwitchedSync:
        outer = OuterMomentum(ctx, self.outer_lr, self.outer_momentum, self.nesterov, scale_by_lr=False)
        return after_switch(self, ctx, outer)


def after_switch(
    config: SlowMo | DiLoCo, ctx: SyncContext, outer: OuterMomentum
) -> LocalSGDSync | StreamingSync | SwitchedSync:
    """Outer steps every H local steps; after mini-batch SGD up to t' when t' > 0 (at t' = 0
    the synchronizer, its state included, is exactly the one without a switch)."""
    local = periodic_sync(config, ctx, config.period, outer)
    if not config.switch_step:
        return local
    return SwitchedSync(ctx, config.switch_step, local, config.name, resolve(config.name, config.compression))
