"""Pieces several algorithms compose: gradient averaging, model averaging, state copies."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from localsgd.algorithms.base import SyncContext
from localsgd.algorithms.compressed import DeltaCompression, average_through
from localsgd.comm.base import WORLD, Scope
from localsgd.comm.codecs import NO_COMPRESSION, Compression, WireState
from localsgd.comm.sharding import local_tensor


def average_gradients(ctx: SyncContext, wire: WireState | None = None) -> None:
    """Average every trainable parameter's gradient over the world (one collective per dtype),
    compressed through ``wire`` when given.

    A missing gradient counts as zeros and every parameter receives the average, so the
    replicas' optimizers see the same gradients and stay identical.
    """
    average_through(ctx, ctx.grads(), wire)


def optimizer_state_tensors(ctx: SyncContext) -> list[torch.Tensor]:
    """The optimizer's per-parameter floating-point state (momentum, Adam moments)."""
    found = []
    owners = ctx.optimizer_params()
    with_state = sum(1 for p in owners if ctx.optimizer.state.get(p))
    if 0 < with_state < len(owners):
        # Ranks could disagree on the payload (state exists only where a gradient arrived),
        # and a collective of mismatched sizes hangs; refuse instead.
        raise ValueError(
            f"optimizer_state='average' needs optimizer state for every trainable parameter, "
            f"but only {with_state} of {len(ctx.params)} have it (parameters without gradients?); "
            "use optimizer_state='local' or 'reset'"
        )
    for p in owners:
        for value in ctx.optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == p.shape:
                found.append(local_tensor(value))
    return found


class ModelAverager:
    """Averages parameters, optionally buffers and optimizer state, in one collective per dtype.

    ``optimizer_state``: ``local`` leaves it alone, ``average`` averages it with the
    parameters, ``reset`` clears it (momentum starts again from the next gradient).
    ``compression``: parameters travel as compressed deltas (:mod:`.compressed`), the rest
    exactly in a second collective.
    """

    def __init__(
        self,
        ctx: SyncContext,
        average_buffers: bool,
        optimizer_state: str,
        compression: Compression = NO_COMPRESSION,
    ) -> None:
        self.ctx = ctx
        self.average_buffers = average_buffers
        self.optimizer_state = optimizer_state
        self.delta = DeltaCompression(ctx, compression) if compression.enabled else None

    def __call__(self, scope: Scope = WORLD) -> None:
        ctx = self.ctx
        if self.delta is not None:
            self.delta(scope)
            rest = ctx.model_tensors(params=False, buffers=True) if self.average_buffers else []
            if self.optimizer_state == "average":
                rest = list(rest) + optimizer_state_tensors(ctx)
            if rest:
                ctx.comm.average(rest, scope)
            self._reset_state()
            return
        tensors = ctx.model_tensors(params=True, buffers=self.average_buffers)
        if self.optimizer_state == "average":
            tensors = list(tensors)
            tensors += optimizer_state_tensors(ctx)
        ctx.comm.average(tensors, scope)
        self._reset_state()

    def _reset_state(self) -> None:
        if self.optimizer_state == "reset":
            for p in self.ctx.optimizer_params():
                self.ctx.optimizer.state.pop(p, None)


class ParametersAlwaysInSync:
    """For algorithms whose replicas hold identical parameters after every update
    (gradient averaging): only the buffers need averaging into the consensus model."""

    ctx: SyncContext

    def after_step(self) -> None:
        pass

    def write_consensus(self, *, record: bool) -> None:
        average_model(self.ctx, params=False, buffers=True, record=record)

    def finalize(self) -> None:
        self.write_consensus(record=True)


def average_model(ctx: SyncContext, *, params: bool, buffers: bool, record: bool) -> None:
    """Average parameters and/or buffers over the world: the consensus of plain averaging."""
    if params or buffers:
        ctx.comm.average(ctx.model_tensors(params=params, buffers=buffers), WORLD, record=record)


def clone_all(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def lr_of(ctx: SyncContext) -> dict[int, float]:
    """The current learning rate of each trainable parameter, by the ``id`` of its entry in
    ``ctx.params`` (a sharded parameter's local shard takes its parameter's)."""
    lrs = {}
    for group in ctx.optimizer.param_groups:
        lr = group.get("lr", 1.0)
        lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        for p in group["params"]:
            lrs[id(p)] = lr
    if ctx.owners is not None:
        return {id(local): lrs[id(p)] for local, p in zip(ctx.params, ctx.owners) if id(p) in lrs}
    return lrs
