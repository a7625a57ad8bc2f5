"""Asynchronous local SGD on a parameter server (Downpour SGD, Dean et al. 2012; Liu et al.
2024, "Asynchronous Local-SGD Training for Language Modeling")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from localsgd.algorithms.async_server import (
    ORDERS,
    STALENESS_LR,
    STALENESS_MODES,
    ParameterServer,
    ServerOptions,
)
from localsgd.algorithms.base import AlgorithmConfig, SyncContext, register
from localsgd.util.checks import ConfigError, check_choice, check_float, check_int

OUTER_OPTIMIZERS = ("sgd", "nesterov")


@register("async_local_sgd")
@dataclass(frozen=True)
class AsyncLocalSGD(AlgorithmConfig):
    """A server holds the global model x. Each worker takes H = ``period`` local steps from
    the model it last received, pushes its model x_k and receives the global model right
    after the server applied it, without waiting for the other workers (unless a staleness
    bound holds it). The server applies
    x ← x − η·d from the pseudo-gradient g = c(τ)·(b_k − x_k) (b_k: the model k started
    from; τ the push's staleness; c(τ) by ``staleness_lr``), d from the outer optimizer
    (plain: d = g; ``nesterov``: Nesterov momentum μ, applied every N-th update as in Liu et
    al.'s delayed Nesterov). H = 1 with plain SGD inside is classic asynchronous SGD; one
    worker with η = 1 is plain SGD, bit for bit.

    Consistency: no two workers need to hold the same model at any time; the global model
    (the consensus, what evaluation sees) lives on the server, which is a thread of rank 0
    (the process engine) or the engine itself (simulated). ``max_staleness`` = s bounds
    staleness as ``staleness_mode`` says: ``push_staleness`` bounds the staleness τ of
    every applied push (s = 0 is synchronous local SGD); ``ssp`` is stale synchronous
    parallel (Ho et al. 2013), which applies every push and bounds the clock gap between
    the fastest and the slowest worker. See :mod:`localsgd.algorithms.async_server`.
    """

    SYMBOLS: ClassVar[dict[str, str]] = {"period": "H"}
    asynchronous: ClassVar[bool] = True
    SHARDED_PARAMETERS: ClassVar[bool] = False  # its server lives on world rank 0

    period: int = 1
    """H: local steps between two pushes. 1 is asynchronous SGD."""
    max_staleness: int | None = None
    """s: the staleness bound, of the kind ``staleness_mode`` names (None: unbounded, fully
    asynchronous)."""
    staleness_mode: str = "push_staleness"
    """What s bounds. ``push_staleness``: the staleness τ of every applied push; a push
    that would exceed s waits, and the laggards' pushes (the oldest base) are applied
    together as one update, their mean (s = 0: synchronous local SGD). ``ssp``: stale
    synchronous parallel (Ho et al. 2013, "More Effective Distributed ML via a Stale
    Synchronous Parallel Parameter Server"): every push is applied as it arrives, and a
    worker at clock c (its pushes so far) starts its next round only when the slowest
    worker that may still push has clock ≥ c − s; it waits, blocked, until then."""
    staleness_lr: str | bool = "none"
    """c(τ), the factor of a push of staleness τ. ``none``: 1. ``inverse``: 1/τ for τ ≥ 1,
    1 at τ = 0: the staleness-dependent learning rate η/τ of Zhang et al. 2016
    ("Staleness-aware Async-SGD for Distributed Deep Learning"). ``inverse_plus_one``:
    1/(1 + τ). ``true`` and ``false`` (from configs written before the rules had names)
    mean ``inverse_plus_one`` and ``none``."""
    outer_optimizer: str = "sgd"
    """The server's update: ``sgd`` (plain) or ``nesterov`` (momentum ``outer_momentum``,
    delayed by ``nesterov_delay``)."""
    outer_lr: float = 1.0
    """η: the server's learning rate on the pseudo-gradient."""
    outer_momentum: float = 0.9
    """μ: the server's Nesterov momentum (``outer_optimizer = "nesterov"`` only)."""
    nesterov_delay: int = 1
    """N: momentum is updated and applied every N-th update, plain steps of g/N in between
    (Liu et al. 2024, delayed Nesterov); 1 is Nesterov on every update."""
    order: str = "arrival"
    """``arrival``: pushes are applied as they arrive (asynchronous). ``round_robin``:
    strictly in the workers' cyclic order, whatever order they arrive in (a deterministic
    schedule: the process engine then equals the simulated one)."""

    def __post_init__(self) -> None:
        check_int("async_local_sgd.period", self.period, 1)
        if self.max_staleness is not None:
            check_int("async_local_sgd.max_staleness", self.max_staleness, 0)
        check_choice("async_local_sgd.staleness_mode", self.staleness_mode, STALENESS_MODES)
        if self.staleness_mode == "ssp" and self.max_staleness is None:
            raise ConfigError(
                "async_local_sgd.staleness_mode = 'ssp' needs async_local_sgd.max_staleness (the bound s)"
            )
        if isinstance(self.staleness_lr, bool):
            # Stores written when this was a switch for 1/(1 + τ) keep their runs' meaning.
            object.__setattr__(self, "staleness_lr", "inverse_plus_one" if self.staleness_lr else "none")
        if self.staleness_lr not in STALENESS_LR:
            raise ConfigError(
                f"async_local_sgd.staleness_lr must be one of {list(STALENESS_LR)} (true and false: "
                f"the old spellings of 'inverse_plus_one' and 'none'), got {self.staleness_lr!r}"
            )
        check_choice("async_local_sgd.outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        check_float("async_local_sgd.outer_lr", self.outer_lr, 0.0, None, low_open=True)
        check_float("async_local_sgd.outer_momentum", self.outer_momentum, 0.0, 1.0)
        check_int("async_local_sgd.nesterov_delay", self.nesterov_delay, 1)
        check_choice("async_local_sgd.order", self.order, ORDERS)
        if self.outer_optimizer == "sgd" and self.nesterov_delay != 1:
            raise ConfigError(
                "async_local_sgd.nesterov_delay needs async_local_sgd.outer_optimizer = 'nesterov'"
            )

    @property
    def sync_period(self) -> int:
        return self.period

    def server_options(self) -> ServerOptions:
        momentum = self.outer_momentum if self.outer_optimizer == "nesterov" else 0.0
        assert isinstance(self.staleness_lr, str)  # normalised in __post_init__
        return ServerOptions(
            max_staleness=self.max_staleness,
            staleness_mode=self.staleness_mode,
            staleness_lr=self.staleness_lr,
            outer_lr=self.outer_lr,
            outer_momentum=momentum,
            nesterov_delay=self.nesterov_delay,
            order=self.order,
            period=self.period,
        )

    def bind(self, ctx: SyncContext) -> AsyncLocalSGDSync:
        return AsyncLocalSGDSync(ctx, self)


class AsyncLocalSGDSync:
    """Counts local steps; every H-th pushes the model (parameters and floating-point
    buffers) and continues from the global model the server returns."""

    def __init__(self, ctx: SyncContext, config: AsyncLocalSGD) -> None:
        self.ctx = ctx
        self.period = config.period
        self.syncs = 0
        self.since_push = 0
        self.server: ParameterServer | None = None
        options = config.server_options()

        def make(initial: list[torch.Tensor]) -> ParameterServer:
            self.server = ParameterServer(initial, ctx.comm.world_size, options)
            return self.server

        ctx.comm.serve(self._tensors(), make)

    def _tensors(self) -> list[torch.Tensor]:
        return self.ctx.model_tensors(params=True, buffers=True)

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        self.since_push += 1
        if self.since_push == self.period:
            self.ctx.comm.push(self._tensors())
            self.syncs += 1
            self.since_push = 0

    def write_consensus(self, *, record: bool) -> None:
        self.ctx.comm.pull(self._tensors(), record=record)

    def finalize(self) -> None:
        if self.since_push > 0:
            self.ctx.comm.push(self._tensors())
            self.syncs += 1
            self.since_push = 0
        self.ctx.comm.pull(self._tensors(), final=True)

    @property
    def updates(self) -> int | None:
        """Updates of the global model so far (on the rank that hosts the server)."""
        return self.server.version if self.server is not None else None

    def details(self) -> dict[str, Any]:
        return {"server": self.server.summary()} if self.server is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "since_push": self.since_push}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Each rank saves its own state at its own moment, and the server's state (on rank
        # 0) at rank 0's: no set of per-rank checkpoints is a consistent cut of the run.
        raise ValueError(
            "async_local_sgd cannot resume from per-rank checkpoints: the workers and the "
            "server are never checkpointed at one moment; start the run again"
        )
