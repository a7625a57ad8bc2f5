"""Hierarchical local SGD: frequent averaging inside blocks, rare averaging across them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from localsgd.algorithms._common import ModelAverager, average_model
from localsgd.algorithms.base import AlgorithmConfig, SyncContext, register, require_keys
from localsgd.algorithms.local_sgd import check_local_options
from localsgd.algorithms.streaming import (
    Streamer,
    check_streaming,
    refuse_compressed,
    streamed_syncs,
    streaming_options,
)
from localsgd.comm.base import WORLD, Block
from localsgd.comm.codecs import NO_COMPRESSION, Compression, resolve
from localsgd.util.checks import check_int


@register("hierarchical_local_sgd")
@dataclass(frozen=True)
class HierarchicalLocalSGD(AlgorithmConfig):
    """Every H = ``period`` steps the workers of each block of G = ``block_size``
    consecutive ranks (one node, say) average among themselves; every H·H_b steps
    (H_b = ``block_period``) all workers average instead (Lin et al. 2020, §4).

    Consistency: after a block sync, replicas within a block are identical; after a
    global sync, all replicas are. The world size must be a multiple of G.
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"period": "H", "block_period": "Hb", "block_size": "G"}
    BLOCK_FIELDS: ClassVar[tuple[str, ...]] = ("block_size",)

    period: int = 4
    """H: local steps between two block averagings."""
    block_period: int = 4
    """H_b: block averagings per global averaging; a global one happens every H·H_b steps."""
    block_size: int = 2
    """G: consecutive ranks per block; must divide the world size."""
    average_buffers: bool = True
    """Average floating-point buffers (BatchNorm statistics) at each sync too."""
    optimizer_state: str = "local"
    """Optimizer state at a sync: ``local``, ``average`` or ``reset``."""
    fragments: int = 1
    """F: the global averaging streamed in F fragments at their own offsets in its period
    H·H_b (:mod:`~localsgd.algorithms.streaming`); block averagings stay whole. F divides H·H_b."""
    overlap: int = 0
    """τ: steps a fragment's global average is in flight before it lands; τ <= H·H_b/F."""
    mixing: float = 0.0
    """α: a landed global average θ̃ becomes (1 − α)·θ̃ + α·θ_local, in [0, 1)."""
    compression: Compression | Mapping[str, Any] = NO_COMPRESSION
    """What crosses the wire at a block or global sync (the change since the last global one):
    ``{codec = "int8", block = 256, ratio = 0.01, error_feedback = true}`` (see
    :mod:`localsgd.comm.codecs`); ``none`` sends it exactly."""

    def __post_init__(self) -> None:
        check_int("hierarchical_local_sgd.period", self.period, 1)
        check_int("hierarchical_local_sgd.block_period", self.block_period, 1)
        check_int("hierarchical_local_sgd.block_size", self.block_size, 1)
        check_local_options("hierarchical_local_sgd", self.average_buffers, self.optimizer_state)
        streaming = check_streaming(
            "hierarchical_local_sgd",
            self.fragments,
            self.overlap,
            self.mixing,
            self.period * self.block_period,
            "hierarchical_local_sgd.period·block_period",
            self.optimizer_state,
        )
        object.__setattr__(self, "compression", resolve("hierarchical_local_sgd", self.compression))
        refuse_compressed("hierarchical_local_sgd", streaming, self.compression)

    @property
    def sync_period(self) -> int:
        """H: the steps between block averagings (the H of Lin et al.'s H·K comparisons)."""
        return self.period

    def planned_syncs(self, steps: int) -> dict[str, int]:
        whole = self.period * self.block_period
        world = streamed_syncs(steps, whole, streaming_options(self))
        return {f"block{self.block_size}": steps // self.period - steps // whole, "world": world}

    def bind(self, ctx: SyncContext) -> HierarchicalSync:
        return HierarchicalSync(self, ctx)


class HierarchicalSync:
    def __init__(self, config: HierarchicalLocalSGD, ctx: SyncContext) -> None:
        self.config = config
        self.ctx = ctx
        self.block = Block(config.block_size)
        ctx.comm.prepare(self.block)
        compression = resolve(config.name, config.compression)
        self.averager = ModelAverager(ctx, config.average_buffers, config.optimizer_state, compression)
        self.step = 0
        self.block_syncs = 0
        self.global_syncs = 0
        self.last_global = 0
        options = streaming_options(config)
        self.streamer = (
            Streamer(
                ctx,
                config.period * config.block_period,
                options,
                average_buffers=config.average_buffers,
                optimizer_state=config.optimizer_state,
                key="hierarchical_local_sgd.fragments",
            )
            if options.active
            else None
        )
        """The global level's fragments, where streamed; block averagings stay whole, and
        none is taken at the steps that end a global period."""

    @property
    def syncs(self) -> int:
        return self.block_syncs + self.global_syncs

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        if self.streamer is not None:
            self.step += 1
            if self.step % self.config.period == 0 and self.step % self.streamer.period != 0:
                self.averager(self.block)
                self.block_syncs += 1
            self.streamer.advance()
            self.global_syncs = self.streamer.syncs
            return
        self.step += 1
        if self.step % (self.config.period * self.config.block_period) == 0:
            self.averager(WORLD)
            self.global_syncs += 1
            self.last_global = self.step
        elif self.step % self.config.period == 0:
            self.averager(self.block)
            self.block_syncs += 1

    def write_consensus(self, *, record: bool) -> None:
        if self.streamer is not None:
            self.streamer.write_consensus(record=record)
            return
        synced = self.last_global == self.step
        average_model(
            self.ctx, params=not synced, buffers=not (synced and self.config.average_buffers), record=record
        )

    def finalize(self) -> None:
        if self.streamer is not None:
            self.streamer.finish()
            self.global_syncs = self.streamer.syncs
            average_model(self.ctx, params=False, buffers=not self.streamer.buffers_in_sync, record=True)
            self.streamer.buffers_in_sync = True
            return
        if self.last_global != self.step:
            self.averager(WORLD)  # the exit averaging is a global sync, optimizer state included
            self.global_syncs += 1
        if not self.config.average_buffers:
            average_model(self.ctx, params=False, buffers=True, record=True)
        self.last_global = self.step

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            "block_syncs": self.block_syncs,
            "global_syncs": self.global_syncs,
            "last_global": self.last_global,
        }
        if self.streamer is not None:
            state["streaming"] = self.streamer.state_dict()
        if self.averager.delta is not None:
            state["compression"] = self.averager.delta.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        require_keys(state, ["step", "block_syncs", "global_syncs", "last_global"], "hierarchical_local_sgd")
        self.step = int(state["step"])
        self.block_syncs = int(state["block_syncs"])
        self.global_syncs = int(state["global_syncs"])
        self.last_global = int(state["last_global"])
        if self.streamer is not None:
            require_keys(state, ["streaming"], "hierarchical_local_sgd with streaming")
            self.streamer.load_state_dict(state["streaming"])
        if self.averager.delta is not None:
            require_keys(state, ["compression"], "hierarchical_local_sgd with compression")
            self.averager.delta.load_state_dict(state["compression"])
