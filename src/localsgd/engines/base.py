"""What every engine shares: the protocol, the registry, the job a run hands an engine.

An engine owns how the K workers of a run execute: launching them (worker processes
through torch's elastic launcher, or one process), the replica layout (one replica per
process, or all K stacked), the communicator, how wall time is measured, and what its
figures mean (:class:`~localsgd.records.EngineInfo`, recorded with every run and read by
reports). Studies call engines; engines never import studies: a run reaches an engine as
a :class:`Job` (its folder holds ``config.json``), and worker processes train it through
the worker entry point (``python -m localsgd.worker``). A study runs many jobs through a
:class:`Session`, which keeps worker processes up from one run to the next.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from localsgd.comm.base import Communicator
from localsgd.records.record import EngineInfo, ErrorInfo
from localsgd.util.checks import ConfigError
from localsgd.util.lifetime import DEFAULT_TIMEOUT_SECONDS


class Capability(enum.Flag):
    """What an engine can do, or how its workers behave, as the run config, studies and
    reports need to know it: an engine declares the set (``Engine.capabilities``), and
    nothing outside this registry asks an engine's name (see :data:`MEANING`)."""

    TRIAL_BATCHING = enum.auto()
    WORKER_SPEEDS = enum.auto()
    STEPS_BY_SPEED = enum.auto()
    SPEEDS_BY_HOLDING_STILL = enum.auto()
    RESTARTS = enum.auto()
    OPTIONS = enum.auto()
    STEPS_WITHOUT_AGREEMENT = enum.auto()
    LOST_WORKERS = enum.auto()

    @property
    def key(self) -> str:
        """The capability as messages and ``localsgd engines`` write it."""
        return (self.name or "").lower()


MEANING: dict[Capability, str] = {
    Capability.TRIAL_BATCHING: (
        "trains several runs of one model shape in one process, as independent groups of "
        "replicas: the trials of a search"
    ),
    Capability.WORKER_SPEEDS: "gives its workers unequal speeds (engine_options), which order a parameter server's pushes",
    Capability.STEPS_BY_SPEED: "lets the workers of an asynchronous run take steps in proportion to their speeds",
    Capability.SPEEDS_BY_HOLDING_STILL: (
        "steps workers of unequal speeds by holding the others still, each at a step of its own: "
        "exact for SGD at a constant learning rate only"
    ),
    Capability.RESTARTS: "restarts a failed worker group from its last mid-run checkpoint (train.max_restarts)",
    Capability.OPTIONS: "takes engine_options of its own",
    Capability.STEPS_WITHOUT_AGREEMENT: (
        "lets its workers step without agreeing with one another (no fp16 overflow agreement, "
        "no step that every worker reaches together)"
    ),
    Capability.LOST_WORKERS: (
        "goes on without a lost worker process (rank > 0) of an asynchronous algorithm: such runs get "
        "a launch that does not stop the group when one worker dies"
    ),
}
"""What each capability means, in the words error messages and docs use."""


class EngineOptions(Protocol):
    """An engine's checked options (what :meth:`Engine.options` returns; None when the
    engine takes none)."""

    def requests(self) -> Mapping[Capability, str]:
        """The capabilities these options ask of their engine, each with the setting that
        asks for it (``"engine_options.worker_speeds = [1.0, 2.0]"``): the run config
        refuses a request the engine does not declare, and checks what a request implies."""
        ...


def requests(options: EngineOptions | None) -> Mapping[Capability, str]:
    """What ``options`` (an engine's checked options, None for none) ask of the engine."""
    return {} if options is None else options.requests()


class WorkerFailure(Exception):
    """The workers of a run failed; ``error`` is the root cause (the first worker's own
    exception: type, message, traceback, rank)."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.line())
        self.error = error


class Cancelled(BaseException):
    """A run was stopped from outside (its session closed under it, the study
    interrupted): not a failure of the run, which stays unfinished and is redone by the
    next attempt. A ``BaseException``, like ``KeyboardInterrupt``, so that handlers which
    record failures let it through."""


@dataclass
class Job:
    """One run, handed to :meth:`Engine.execute`."""

    workers: int
    """K: the run's workers."""
    threads: int
    """Intra-op CPU threads per worker process."""
    run_dir: Path
    """The run's folder; it holds ``config.json`` (the run config workers read)."""
    train: Callable[[int, int], None]
    """Trains the run in this process as ``train(rank, world_size)``."""
    timeout: float | None = None
    """Seconds the whole run may take (None: no limit)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment variables for worker processes."""
    device: str = "auto"
    """The run's ``device`` setting: worker processes that outlive the run (a pool) pick
    their process group's backend from it (NCCL for CUDA, gloo otherwise)."""
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    """The run's ``engine_options`` (what :meth:`Engine.processes` may depend on)."""
    comm_timeout: float = DEFAULT_TIMEOUT_SECONDS
    """``train.timeout_seconds``: how long a collective or the rendezvous may wait, and (at
    half of it) how long a worker may stay silent before the run fails naming its rank."""
    max_restarts: int = 0
    """``train.max_restarts``: restarts of the worker group torch's elastic launcher may
    make after a worker dies; such a run gets a launch of its own (never a pool)."""
    tolerates_lost_workers: bool = False
    """A worker other than rank 0 may die and the run goes on without it (an asynchronous
    algorithm: rank 0's parameter server loses the worker, the others keep pushing). Such a
    run gets a launch of its own that does not stop the group when one worker dies
    (:mod:`localsgd.engines.launching.tolerant`; never a pool, never torch's elastic
    launcher)."""


class Session(Protocol):
    """Runs jobs one after another, keeping what it can between them (worker processes
    with their process group and data: see :mod:`localsgd.engines.launching.pool`). A study opens
    one per engine (and per parallel slot) and closes it at the end; closing it stops
    every process it started."""

    def execute(self, job: Job) -> None:
        """As :meth:`Engine.execute`."""
        ...

    def close(self) -> None:
        """Stop every worker process this session started (a run in progress is
        :class:`Cancelled`)."""
        ...


class Replicas(Protocol):
    """An engine's view of the K replicas one process trains: what the training loop
    steps, which batches it feeds, how it evaluates the consensus model."""

    @property
    def module(self) -> nn.Module:
        """What the optimizer and ``DataParallel`` see (one replica, or all K stacked)."""
        ...

    @property
    def comm(self) -> Communicator | None:
        """The communicator (None: ``DataParallel`` picks the process group's)."""
        ...

    @property
    def flat(self) -> bool:
        """Whether ``DataParallel`` should re-home the parameters into flat storage."""
        ...

    def param_ndim(self, p: torch.Tensor) -> int:
        """A parameter's own number of dimensions (without a replica dimension)."""
        ...

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer this layout cannot step correctly."""
        ...

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[Any]:
        """The batches of one epoch this process feeds its replicas."""
        ...

    def forward_backward(self, batch: Any) -> torch.Tensor:
        """Set the gradients of ``module`` from ``batch``; return the loss(es), detached."""
        ...

    def unscale_(self, scaler: Any, dp: Any) -> None:
        """Unscale the gradients of an fp16 ``GradScaler`` so that every worker agrees on
        whether a step overflowed (a collective where workers are processes)."""
        ...

    def worker_mean(self, value: torch.Tensor, dp: Any) -> float:
        """The mean over all K workers of a per-worker value (a collective)."""
        ...

    def mean_loss(
        self, total: torch.Tensor | float, count: int
    ) -> tuple[torch.Tensor | float, torch.Tensor | int]:
        """Each worker's mean training loss over its own steps since the last call, and
        those steps, from the sum of the losses :meth:`forward_backward` returned over
        ``count`` steps of the training loop."""
        ...

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """The workload's metrics of the model in place (the consensus, under
        ``dp.consensus()``) on ``split`` (``validation`` or ``test``); ``{}`` on ranks that
        do not evaluate."""
        ...

    def begin(
        self,
        optimizer: torch.optim.Optimizer,
        lr: Callable[[int], float],
        total_steps: int,
        batch_size: int,
        seed: int,
    ) -> None:
        """Training starts (``DataParallel`` has entered): a layout with workers of its own
        starts them, with their own ``optimizer`` of the same class and settings, the
        schedule ``lr(step)`` (picklable) and ``total_steps`` steps each."""
        ...

    def iterations(self, total_steps: int) -> int:
        """Steps of the training loop that give every worker ``total_steps`` steps (more when
        some replicas are held still while others step: simulated workers of unequal speed)."""
        ...

    def worker_steps(self, iteration: int) -> float:
        """The mean steps per worker after ``iteration`` steps of the training loop."""
        ...

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        """Around putting the consensus in place and evaluating it: workers of the layout's
        own hold still meanwhile."""
        ...

    def updates(self, dp: Any) -> int | None:
        """Updates the evaluated model has received so far (``dp.updates`` unless the
        layout has workers of its own; None when this process cannot tell)."""
        ...

    def finish(self) -> None:
        """Wait for the workers the layout started itself (before the final evaluation)."""
        ...

    def final_model(self) -> nn.Module:
        """The consensus model after training, as a plain module (for the checkpoint)."""
        ...

    def details(self) -> dict[str, Any]:
        """Engine-specific notes for the run's status."""
        ...


class Engine(Protocol):
    """How the K workers of a run execute; see the module docstring."""

    info: EngineInfo
    capabilities: Capability
    """What the engine can do (:class:`Capability`); what its figures mean is ``info``."""

    def options(self, raw: Mapping[str, Any] | None, workers: int | None = None) -> EngineOptions | None:
        """The run's ``engine_options`` table checked (against ``workers`` when given) and
        made this engine's own options (None for an engine that takes none);
        ``ConfigError`` naming ``engine_options.<key>``."""
        ...

    def processes(self, workers: int, options: Mapping[str, Any] | None = None) -> int:
        """How many processes (the torch.distributed world size) K workers take."""
        ...

    def execute(self, job: Job) -> None:
        """Run ``job`` to the end on processes of its own (started for it, stopped after
        it); raise :class:`WorkerFailure` when workers failed, or the exception of a run
        trained in this process."""
        ...

    def session(self, *, in_process: bool = True) -> Session:
        """A session for many runs of this engine. ``in_process``: a run of one process
        may train in the calling process (False when the caller trains several runs at
        once, which must not share one process's global state)."""
        ...

    def replicas(
        self,
        workload: Any,
        model: nn.Module,
        *,
        rank: int,
        world_size: int,
        workers: int,
        device: torch.device,
        delay: Mapping[str, float] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Replicas:
        """This process's view of the replicas of ``model``. ``delay``: seconds added to
        every counted collective of a scope (a run's ``comm.delay``), which the engine
        either waits out or records for the cost model's estimates. ``options``: the run's
        ``engine_options``."""
        ...


@runtime_checkable
class TrialBatching(Protocol):
    """What an engine that declares :attr:`Capability.TRIAL_BATCHING` has: it trains several
    runs of one model shape in one process, as independent groups of replicas (the trials of
    a search)."""

    def trial_replicas(
        self,
        workload: Any,
        models: Sequence[nn.Module],
        *,
        workers: int,
        seeds: Sequence[int],
        device: torch.device,
        delay: Mapping[str, float] | None = None,
    ) -> Any:
        """R trials of ``workers`` replicas each: one per initial model and data seed."""
        ...


_REGISTRY: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    """Make ``engine`` available by ``engine.info.name``."""
    name = engine.info.name
    if name in _REGISTRY:
        raise ValueError(f"engine name {name!r} is already registered")
    if not isinstance(engine.capabilities, Capability):
        raise ValueError(f"engine {name!r} must declare its capabilities as a Capability set")
    if Capability.TRIAL_BATCHING in engine.capabilities and not isinstance(engine, TrialBatching):
        raise ValueError(f"engine {name!r} declares trial_batching but has no trial_replicas")
    _REGISTRY[name] = engine
    return engine


def unregister(name: str) -> None:
    """Forget the engine registered as ``name`` (an engine a test defined)."""
    _REGISTRY.pop(name, None)


def having(capability: Capability) -> list[str]:
    """The registered engines that declare ``capability``, sorted."""
    return [name for name in names() if capability in _REGISTRY[name].capabilities]


def require(engine: Engine, capability: Capability, setting: str) -> None:
    """``ConfigError`` naming ``setting`` unless ``engine`` declares ``capability``."""
    if capability not in engine.capabilities:
        raise ConfigError(
            f"{setting}: engine {engine.info.name!r} does not declare {capability.key} (it "
            f"{MEANING[capability]}); engines that do: {having(capability)}"
        )


def names() -> list[str]:
    """Registered engine names, sorted."""
    return sorted(_REGISTRY)


def get(name: object, key: str = "engine") -> Engine:
    """The engine registered as ``name``; ``ConfigError`` naming ``key`` otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"{key} must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def no_options(engine: str, raw: Mapping[str, Any] | None) -> None:
    """An engine without options refuses any."""
    if raw:
        raise ConfigError(
            f"engine_options.{sorted(raw)[0]}: engine {engine!r} takes no options; "
            f"engine_options are for engine = one of {having(Capability.OPTIONS)}"
        )


def check_world(
    engine: Engine, workers: int, world_size: int, options: Mapping[str, Any] | None = None
) -> None:
    """Refuse a process group whose size does not fit ``workers`` on ``engine``."""
    expected = engine.processes(workers, options)
    if world_size != expected:
        hint = "start it without torchrun" if expected == 1 else f"start {expected} processes"
        raise ConfigError(
            f"engine {engine.info.name!r} runs workers = {workers} as {expected} process(es), but "
            f"the process group has {world_size} rank(s); {hint}"
        )
