"""Post-local SGD: mini-batch SGD until a switch step, local SGD after it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from localsgd.algorithms.base import AlgorithmConfig, SyncContext, register, require_keys
from localsgd.algorithms.local_sgd import LocalSGDSync, check_local_options, periodic_sync
from localsgd.algorithms.minibatch import MiniBatchSync
from localsgd.algorithms.streaming import (
    StreamingSync,
    check_streaming,
    refuse_compressed,
    streaming_options,
    switched_syncs,
)
from localsgd.comm.codecs import NO_COMPRESSION, Compression, resolve
from localsgd.util.checks import check_int


@register("post_local_sgd")
@dataclass(frozen=True)
class PostLocalSGD(AlgorithmConfig):
    """Steps t < t' = ``switch_step`` average gradients (mini-batch SGD); from t' on, every
    worker takes H = ``period`` local steps between model averagings (Lin et al. 2020).

    Consistency: identical parameters after every step before t'; after t', identical
    right after each sync (every H-th step counted from t').
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"switch_step": "t'", "period": "H"}

    switch_step: int = 0
    """t': the first optimizer step taken locally (0-based). 0 is local SGD from the start."""
    period: int = 8
    """H: local steps between two averagings after the switch."""
    average_buffers: bool = True
    """Average floating-point buffers (BatchNorm statistics) at each local-SGD sync."""
    optimizer_state: str = "local"
    """Optimizer state at a local-SGD sync: ``local``, ``average`` or ``reset``."""
    fragments: int = 1
    """F: after the switch, fragments streamed at their own offsets in the period
    (:mod:`~localsgd.algorithms.streaming`); F divides H."""
    overlap: int = 0
    """τ: steps a fragment's average is in flight before it lands; τ <= H/F."""
    mixing: float = 0.0
    """α: a landed average θ̃ becomes (1 − α)·θ̃ + α·θ_local, in [0, 1)."""
    compression: Compression | Mapping[str, Any] = NO_COMPRESSION
    """What crosses the wire (gradients before t', changes since the last sync after): ``{codec
    = "int8", block = 256, ratio = 0.01, error_feedback = true}`` (see
    :mod:`localsgd.comm.codecs`); ``none`` sends it exactly."""

    def __post_init__(self) -> None:
        check_int("post_local_sgd.switch_step", self.switch_step, 0)
        check_int("post_local_sgd.period", self.period, 1)
        check_local_options("post_local_sgd", self.average_buffers, self.optimizer_state)
        streaming = check_streaming(
            "post_local_sgd",
            self.fragments,
            self.overlap,
            self.mixing,
            self.period,
            "post_local_sgd.period",
            self.optimizer_state,
        )
        object.__setattr__(self, "compression", resolve("post_local_sgd", self.compression))
        refuse_compressed("post_local_sgd", streaming, self.compression)

    @property
    def sync_period(self) -> int:
        return self.period

    def planned_syncs(self, steps: int) -> dict[str, int]:
        return switched_syncs(steps, self.switch_step, self.period, streaming_options(self))

    def bind(self, ctx: SyncContext) -> SwitchedSync:
        local = periodic_sync(self, ctx, self.period)
        return SwitchedSync(ctx, self.switch_step, local, self.name, resolve(self.name, self.compression))


class SwitchedSync:
    """Mini-batch SGD (gradients averaged every step) for the steps t < t', then ``local``
    from t' on, restarted at the switch (an outer optimizer anchors at the model there).
    Post-local SGD's schedule; SlowMo and DiLoCo after a switch use it too."""

    def __init__(
        self,
        ctx: SyncContext,
        switch_step: int,
        local: LocalSGDSync | StreamingSync,
        name: str,
        compression: Compression = NO_COMPRESSION,
    ) -> None:
        self.switch_step = switch_step
        self.name = name
        self.step = 0
        self.minibatch = MiniBatchSync(ctx, compression)
        self.local = local

    @property
    def syncs(self) -> int:
        return self.minibatch.syncs + self.local.syncs

    @property
    def switched(self) -> bool:
        return self.step >= self.switch_step

    def before_step(self) -> None:
        if not self.switched:
            self.minibatch.before_step()

    def skipped_step(self) -> None:
        if not self.switched:
            self.minibatch.skipped_step()
        self.after_step()

    def after_step(self) -> None:
        if self.switched:
            self.local.after_step()
        self.step += 1
        if self.step == self.switch_step:
            self.local.restart()

    def write_consensus(self, *, record: bool) -> None:
        if self.step > self.switch_step:
            self.local.write_consensus(record=record)
        else:
            self.minibatch.write_consensus(record=record)

    def finalize(self) -> None:
        # Buffers were never averaged before the switch, so finish through the local path.
        self.local.buffers_in_sync = self.local.buffers_in_sync and self.step > self.switch_step
        self.local.finalize()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "minibatch": self.minibatch.state_dict(),
            "local": self.local.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        require_keys(state, ["step", "minibatch", "local"], self.name)
        self.step = int(state["step"])
        self.minibatch.load_state_dict(state["minibatch"])
        self.local.load_state_dict(state["local"])
