"""Local SGD: H local steps on every worker, then the models are averaged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from localsgd.algorithms._common import ModelAverager, average_model
from localsgd.algorithms.base import (
    OPTIMIZER_STATE_CHOICES,
    AlgorithmConfig,
    SyncContext,
    register,
    require_keys,
)
from localsgd.algorithms.streaming import (
    StreamingSync,
    check_streaming,
    refuse_compressed,
    streamed_syncs,
    streaming_options,
)
from localsgd.comm.codecs import NO_COMPRESSION, Compression, resolve
from localsgd.util.checks import check_bool, check_choice, check_int


def check_local_options(prefix: str, average_buffers: object, optimizer_state: object) -> None:
    check_bool(f"{prefix}.average_buffers", average_buffers)
    check_choice(f"{prefix}.optimizer_state", optimizer_state, OPTIMIZER_STATE_CHOICES)


@register("local_sgd")
@dataclass(frozen=True)
class LocalSGD(AlgorithmConfig):
    """Every worker takes H = ``period`` optimizer steps on its own data, then all workers
    average their parameters (Stich 2019; Lin et al. 2020, "Don't use large mini-batches,
    use local SGD").

    Consistency: parameters are identical on every replica right after each sync (every
    H-th step) and differ in between.
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"period": "H"}

    period: int = 8
    """H: local steps between two averagings. 1 is mini-batch SGD for plain SGD."""
    average_buffers: bool = True
    """Average floating-point buffers (BatchNorm running statistics) at each sync too."""
    optimizer_state: str = "local"
    """At a sync, the optimizer state (momentum) is kept ``local``, averaged (``average``,
    in the same collective) or ``reset``."""
    fragments: int = 1
    """F: the parameters stream in F fragments, each synced at its own offset in the period
    (see :mod:`localsgd.algorithms.streaming`); F divides H."""
    overlap: int = 0
    """τ: steps a fragment's average is in flight before it lands; τ <= H/F."""
    mixing: float = 0.0
    """α: a landed average θ̃ becomes (1 − α)·θ̃ + α·θ_local, in [0, 1)."""
    compression: Compression | Mapping[str, Any] = NO_COMPRESSION
    """What crosses the wire at a sync (the change since the last one): ``{codec = "int8",
    block = 256, ratio = 0.01, error_feedback = true}`` (see :mod:`localsgd.comm.codecs`);
    ``none`` sends it exactly."""

    def __post_init__(self) -> None:
        check_int("local_sgd.period", self.period, 1)
        check_local_options("local_sgd", self.average_buffers, self.optimizer_state)
        streaming = check_streaming(
            "local_sgd", self.fragments, self.overlap, self.mixing, self.period, "local_sgd.period", self.optimizer_state
        )
        object.__setattr__(self, "compression", resolve("local_sgd", self.compression))
        refuse_compressed("local_sgd", streaming, self.compression)

    @property
    def sync_period(self) -> int:
        return self.period

    def planned_syncs(self, steps: int) -> dict[str, int]:
        return {"world": streamed_syncs(steps, self.period, streaming_options(self))}

    def bind(self, ctx: SyncContext) -> LocalSGDSync | StreamingSync:
        return periodic_sync(self, ctx, self.period)


class PeriodicConfig(Protocol):
    """The fields a periodic averaging algorithm's synchronizer is built from."""

    @property
    def average_buffers(self) -> bool: ...

    @property
    def optimizer_state(self) -> str: ...

    @property
    def compression(self) -> Compression | Mapping[str, Any]: ...

    name: ClassVar[str]


def periodic_sync(
    config: PeriodicConfig, ctx: SyncContext, period: int, outer: AfterAverage | None = None
) -> LocalSGDSync | StreamingSync:
    """An average every H = ``period`` local steps (then ``outer``), streamed where the
    config's F, τ or α ask for it."""
    options = streaming_options(config)
    if options.active:
        return StreamingSync(
            ctx,
            period,
            options,
            average_buffers=config.average_buffers,
            optimizer_state=config.optimizer_state,
            outer=outer,
            key=f"{config.name}.fragments",
        )
    compression = resolve(config.name, config.compression)
    averager = ModelAverager(ctx, config.average_buffers, config.optimizer_state, compression)
    return LocalSGDSync(ctx, period, averager, outer)


class AfterAverage(Protocol):
    """Work done right after the replicas were averaged (SlowMo's and DiLoCo's outer step)."""

    def apply(self, *, commit: bool = True) -> None: ...

    def step(
        self, indices: Sequence[int], averaged: Mapping[int, torch.Tensor], *, commit: bool = True
    ) -> list[tuple[list[int], list[torch.Tensor]]]:
        """The step of some parameters alone (a streamed fragment), returning their models."""
        ...

    def restart(self) -> None:
        """Start afresh from the current (identical) parameters: local SGD begins here."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class LocalSGDSync:
    """Counts local steps and averages every ``period``-th one; ``outer`` runs after."""

    def __init__(
        self,
        ctx: SyncContext,
        period: int,
        averager: ModelAverager,
        outer: AfterAverage | None = None,
    ) -> None:
        self.ctx = ctx
        self.period = period
        self.averager = averager
        self.outer = outer
        self.syncs = 0
        self.since_sync = 0
        self.buffers_in_sync = True

    def before_step(self) -> None:
        pass

    def restart(self) -> None:
        """Local steps begin from the current parameters, identical on every replica (the
        model at post-local SGD's switch): the outer optimizer anchors there."""
        if self.outer is not None:
            self.outer.restart()
        if self.averager.delta is not None:
            self.averager.delta.restart()

    def after_step(self) -> None:
        self.since_sync += 1
        self.buffers_in_sync = False
        if self.since_sync == self.period:
            self.sync()

    def sync(self) -> None:
        self.averager()
        if self.outer is not None:
            self.outer.apply()
        self.syncs += 1
        self.since_sync = 0
        self.buffers_in_sync = self.averager.average_buffers

    def write_consensus(self, *, record: bool) -> None:
        # The model a sync now would produce (without its outer-optimizer state changes),
        # which is also what finalize() leaves on exit.
        average_model(self.ctx, params=self.since_sync > 0, buffers=not self.buffers_in_sync, record=record)
        if self.outer is not None and self.since_sync > 0:
            self.outer.apply(commit=False)

    def finalize(self) -> None:
        if self.since_sync > 0:
            self.sync()
        average_model(self.ctx, params=False, buffers=not self.buffers_in_sync, record=True)
        self.buffers_in_sync = True

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "syncs": self.syncs,
            "since_sync": self.since_sync,
            "buffers_in_sync": self.buffers_in_sync,
        }
        if self.outer is not None:
            state["outer"] = self.outer.state_dict()
        if self.averager.delta is not None:
            state["compression"] = self.averager.delta.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        require_keys(state, ["syncs", "since_sync", "buffers_in_sync"], "local SGD")
        self.syncs = int(state["syncs"])
        self.since_sync = int(state["since_sync"])
        self.buffers_in_sync = bool(state["buffers_in_sync"])
        if self.outer is not None:
            require_keys(state, ["outer"], "local SGD with an outer optimizer")
            self.outer.load_state_dict(state["outer"])
        if self.averager.delta is not None:
            require_keys(state, ["compression"], "local SGD with compression")
            self.averager.delta.load_state_dict(state["compression"])
