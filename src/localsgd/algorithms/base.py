"""What every algorithm shares: the runtime context, the protocol, the registry.

An algorithm is two objects. Its *config* is a frozen dataclass the user builds
(``LocalSGD(period=8)``): every hyperparameter a documented field, validated on
construction, round-tripping to a plain dict. When :class:`~localsgd.DataParallel` enters,
``config.bind(ctx)`` returns its *synchronizer*: the runtime that holds mutable state (step
counters, outer momentum, central model) and runs around each optimizer step.

Synchronizers only touch tensors through elementwise math and the communicator, so they do
not care whether a tensor is one replica's (process engine) or every replica stacked along
a leading dimension (simulated engine).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from localsgd.comm.base import Communicator
from localsgd.comm.codecs import NO_COMPRESSION, Compression
from localsgd.comm.flat import Spans
from localsgd.comm.sharding import local_tensor
from localsgd.util.checks import ConfigError, from_dict

OPTIMIZER_STATE_CHOICES = ("local", "average", "reset")


@dataclass
class SyncContext:
    """What a synchronizer may touch.

    ``params`` are the model's trainable parameters and ``buffers`` its floating-point
    buffers (BatchNorm statistics), both in a fixed order shared by every replica.
    """

    comm: Communicator
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    flat: bool = True
    """Whether parameters and buffers were laid out back to back (``DataParallel(flat=True)``);
    engines with their own layout (stacked replicas) hand tensors over as they are."""
    gradients_averaged: Callable[[], None] | None = None
    """Set when gradients arrive averaged over the world already (a model wrapped in
    ``DistributedDataParallel``, whose bucketed all-reduce overlaps the backward pass): an
    algorithm that averages gradients every step calls it, to count that traffic, instead
    of averaging again (see ``AlgorithmConfig.USES_DDP_GRADIENTS``)."""
    owners: list[torch.Tensor] | None = None
    """Where ``params`` are the local shards of sharded parameters (FSDP2's ``DTensor``):
    the parameters themselves, in the same order. The optimizer holds these, keys its state
    and learning rates by them, and gradients arrive on them; an algorithm reaches them
    through :meth:`optimizer_params` and :meth:`grads`. None where ``params`` are the
    parameters."""
    _spans: dict[tuple[bool, bool], Spans] = field(default_factory=dict, init=False, repr=False)

    def optimizer_params(self) -> list[torch.Tensor]:
        """The tensors the optimizer holds, index for index with ``params``."""
        return self.params if self.owners is None else self.owners

    def grads(self) -> list[torch.Tensor]:
        """Each trainable parameter's gradient as a tensor the communicator can average (a
        sharded gradient's local shard); a missing gradient becomes zeros first, so every
        replica hands over the same payload."""
        found = []
        for p in self.optimizer_params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            found.append(local_tensor(p.grad))
        return found

    def model_tensors(self, *, params: bool = True, buffers: bool = False) -> list[torch.Tensor]:
        """Parameters and/or buffers to hand to the communicator: one flat span per dtype
        when they lie back to back (as ``DataParallel`` lays them out), else the tensors."""
        if not self.flat:
            return (self.params if params else []) + (self.buffers if buffers else [])
        # Called at every sync: the spans are found once per selection and only checked
        # (one data pointer per tensor) afterwards.
        spans = self._spans.get((params, buffers))
        if spans is None:
            chosen = (self.params if params else []) + (self.buffers if buffers else [])
            spans = self._spans[(params, buffers)] = Spans(chosen)
        return spans.get()


class Synchronizer(Protocol):
    """The runtime half of an algorithm; see the module docstring.

    A step a ``GradScaler`` skipped (gradients overflowed on some rank; every rank skips
    it) never reaches ``optimizer.step()``; ``DataParallel`` then calls the synchronizer's
    ``skipped_step()`` if it has one, else ``after_step()``: the schedule counts the step,
    taken with no update, and a sync due at it happens at it. A synchronizer whose
    ``before_step`` reads the gradients (they are not finite) defines ``skipped_step``.
    """

    @property
    def syncs(self) -> int:
        """Communication rounds so far (gradient or model averagings)."""
        ...

    def before_step(self) -> None:
        """Runs before ``optimizer.step()``: gradients are final, parameters untouched."""

    def after_step(self) -> None:
        """Runs after ``optimizer.step()``."""

    def write_consensus(self, *, record: bool) -> None:
        """Overwrite this replica's parameters and buffers with the consensus model."""

    def finalize(self) -> None:
        """Leave the consensus model on every replica (``DataParallel.__exit__``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class AlgorithmCapabilities:
    """What an algorithm config declares about itself, as the run config, studies and
    reports need to know it (:attr:`AlgorithmConfig.capabilities`); nothing outside the
    registry asks an algorithm's name."""

    asynchronous: bool = False
    """Workers never wait for one another (a parameter server): see
    :attr:`AlgorithmConfig.asynchronous`."""
    reads_inner_lr: bool = False
    """The synchronizer reads the inner optimizer's learning rate: runs batched as trials
    must share one rate schedule."""
    uses_ddp_gradients: bool = False
    """On a ``DistributedDataParallel`` model, DDP averages the gradients of every backward."""
    synchronous_baseline: bool = False
    """The synchronous data-parallel baseline a report marks beside the local algorithms."""
    sharded_parameters: bool = True
    """Runs on a sharded model (FSDP2), each rank averaging its local shards with the same
    shards of the other replicas: see :attr:`AlgorithmConfig.SHARDED_PARAMETERS`."""
    blocks: tuple[tuple[str, int], ...] = ()
    """Each block scope the algorithm averages over, as (its config field, G): blocks of G
    consecutive workers, so G must divide the workers."""
    compression: Compression = NO_COMPRESSION
    """How its syncs cross the wire (its ``compression`` field): the payload and the
    collective (an all-gather for a codec) an estimate before the run prices."""


class AlgorithmConfig:
    """Base of the algorithm configs: name, paper symbols, period, dict round trip, bind.

    Subclasses are frozen dataclasses registered with :func:`register`. ``SYMBOLS`` maps
    the headline fields to their paper symbols, in the order a label prints them;
    ``OPTIONAL_SYMBOLS`` the fields a label prints by symbol after them only where they
    differ from the default (SlowMo's t'); ``RENAMED`` maps old field names to new ones
    (the old name gets an error naming the new). The class variables below declare what
    the algorithm needs of a run; :attr:`capabilities` gathers them.
    """

    name: ClassVar[str]
    SYMBOLS: ClassVar[dict[str, str]] = {}
    OPTIONAL_SYMBOLS: ClassVar[dict[str, str]] = {}
    RENAMED: ClassVar[dict[str, str]] = {}
    asynchronous: ClassVar[bool] = False
    """Workers never wait for one another: the consensus model lives on a server that one
    rank hosts, so only that rank evaluates it, and only after every worker has finished
    for the final evaluation (no collectives once training has started)."""
    USES_DDP_GRADIENTS: ClassVar[bool] = False
    """Whether, on a ``DistributedDataParallel`` model, the algorithm lets DDP average the
    gradients of every backward pass (mini-batch SGD); otherwise every backward pass runs
    as under ``no_sync()`` and the algorithm communicates through the communicator."""
    SYNCHRONOUS_BASELINE: ClassVar[bool] = False
    """Whether this is the synchronous data-parallel baseline (gradients averaged before every
    step): the reference a report marks beside the local algorithms at each K."""
    READS_INNER_LR: ClassVar[bool] = False
    """Whether the synchronizer reads the inner optimizer's learning rate (SlowMo scales
    its outer step by it): runs batched as trials must then share one rate schedule."""
    SHARDED_PARAMETERS: ClassVar[bool] = True
    """Whether the synchronizer works on local shards (``SyncContext.owners`` set): it
    reaches gradients, optimizer state and learning rates only through the context's
    helpers, never through ``params[i].grad``."""
    BLOCK_FIELDS: ClassVar[tuple[str, ...]] = ()
    """Fields holding a block size G (blocks of G consecutive workers average among
    themselves): the run config checks that each divides the workers."""

    @property
    def capabilities(self) -> AlgorithmCapabilities:
        """What this config declares (its class variables, its block sizes)."""
        return AlgorithmCapabilities(
            asynchronous=self.asynchronous,
            reads_inner_lr=self.READS_INNER_LR,
            uses_ddp_gradients=self.USES_DDP_GRADIENTS,
            synchronous_baseline=self.SYNCHRONOUS_BASELINE,
            sharded_parameters=self.SHARDED_PARAMETERS,
            blocks=tuple((key, int(getattr(self, key))) for key in self.BLOCK_FIELDS),
            compression=getattr(self, "compression", NO_COMPRESSION),
        )

    @property
    def sync_period(self) -> int | None:
        """H for the H·K view: local steps between two averagings of the whole model; 1 for
        algorithms that synchronise every step; None where no comparable period exists."""
        return None

    def planned_syncs(self, steps: int) -> dict[str, int] | None:
        """Synchronisations per scope in a run of ``steps`` optimizer steps, labelled as a
        run's counters label them (``{"world": n}``; ``{"block2": m, "world": n}``): what
        the cost model needs to estimate a run before it runs. None where the schedule is
        not fixed in advance (a parameter server's pushes). The consensus taken on leaving
        ``DataParallel`` (at most one more) is not counted. Exact for every registered
        algorithm (``tests/algorithms/test_planned_syncs.py`` counts them in runs)."""
        if self.asynchronous or self.sync_period is None:
            return None
        return {"world": steps // self.sync_period}

    def bind(self, ctx: SyncContext) -> Synchronizer:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self)
        return {"name": self.name, **dataclasses.asdict(self)}

    def label(self, shown: Mapping[str, str] | None = None, omit: Collection[str] = ()) -> str:
        """``"local_sgd H=4"``: the name, the headline fields by symbol, the optional ones
        that differ from their defaults by symbol, then every other field that differs from
        its default as ``field=value``. ``shown`` gives a field's text in place of its value
        (``{"switch_step": "2.5ep"}``; always printed), ``omit`` leaves fields out."""
        assert dataclasses.is_dataclass(self)
        shown = dict(shown or {})
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        defaults = defaults_of(type(self))

        def text(key: str) -> str:
            return shown[key] if key in shown else format_value(values[key])

        def differs(key: str) -> bool:
            return key in shown or key not in defaults or values[key] != defaults[key]

        parts = [self.name]
        parts += [f"{symbol}={text(key)}" for key, symbol in self.SYMBOLS.items() if key not in omit]
        parts += [
            f"{symbol}={text(key)}"
            for key, symbol in self.OPTIONAL_SYMBOLS.items()
            if key not in omit and differs(key)
        ]
        symbols = {**self.SYMBOLS, **self.OPTIONAL_SYMBOLS}
        parts += [
            f"{key}={text(key)}"
            for key in sorted(values)
            if key not in symbols and key not in omit and differs(key)
        ]
        return " ".join(parts)


def defaults_of(cls: type) -> dict[str, Any]:
    """A config class's field defaults."""
    assert dataclasses.is_dataclass(cls), cls
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_REGISTRY: dict[str, type[AlgorithmConfig]] = {}
C = TypeVar("C", bound=type[AlgorithmConfig])


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make the config buildable from ``{"name": name, ...}``."""

    def deco(cls: C) -> C:
        if name in _REGISTRY:
            raise ValueError(f"algorithm name {name!r} is already registered")
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set[str]()
        missing = [key for key in cls.BLOCK_FIELDS if key not in fields]
        if missing:
            raise ValueError(f"algorithm {name!r} declares BLOCK_FIELDS {missing} it has no field for")
        cls.name = name
        if cls.RENAMED:
            _refuse_renamed_keywords(cls)
        _REGISTRY[name] = cls
        return cls

    return deco


def _refuse_renamed_keywords(cls: type[AlgorithmConfig]) -> None:
    """``SlowMo(momentum=0.5)`` names the field's new name instead of a bare TypeError."""
    init = cls.__init__

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        for old, new in cls.RENAMED.items():
            if old in kwargs:
                raise ConfigError(f"{cls.name}.{old} was renamed: use {cls.name}.{new}")
        init(self, *args, **kwargs)

    cls.__init__ = checked  # type: ignore[method-assign]


def unregister(name: str) -> None:
    """Forget the algorithm registered as ``name`` (one a test defined)."""
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    """Registered algorithm names, sorted."""
    return sorted(_REGISTRY)


def get(name: object) -> type[AlgorithmConfig]:
    try:
        return _REGISTRY[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ConfigError(f"algorithm name {name!r} is unknown; allowed: {names()}") from None


def build(spec: Mapping[str, Any] | AlgorithmConfig) -> AlgorithmConfig:
    """An algorithm config from a plain dict such as ``{"name": "local_sgd", "period": 8}``.

    Unknown keys, renamed keys and values of the wrong type raise :class:`ConfigError`
    (a ``ValueError``) naming the key.
    """
    if isinstance(spec, AlgorithmConfig):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(f"algorithm spec must be a mapping with a 'name' key, got {spec!r}")
    if "name" not in spec:
        raise ConfigError(f"algorithm spec needs a 'name' key; allowed names: {names()}")
    cls = get(spec["name"])
    return from_dict(cls, {k: v for k, v in spec.items() if k != "name"}, cls.name)


def load_tensors(field: str, destination: Sequence[torch.Tensor], source: Sequence[torch.Tensor]) -> None:
    """Copy a saved tensor list into live tensors, checking that the shapes match."""
    if len(destination) != len(source):
        raise ValueError(f"state {field!r} holds {len(source)} tensors, the model has {len(destination)}")
    with torch.no_grad():
        for i, (dst, src) in enumerate(zip(destination, source)):
            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(
                    f"state {field!r} tensor {i} has shape {tuple(src.shape)}, "
                    f"the model's has {tuple(dst.shape)}"
                )
            dst.copy_(src)


def require_keys(state: Mapping[str, Any], keys: Sequence[str], algorithm: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{algorithm} state is missing {missing}; was it saved by {algorithm}?")
