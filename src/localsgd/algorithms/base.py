"""What every algorithm shares: the runtime context, the protocol, the registry, validation.

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
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from localsgd.comm.base import Communicator
from localsgd.comm.flat import Spans

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
    _spans: dict[tuple[bool, bool], Spans] = field(default_factory=dict, init=False, repr=False)

    def model_tensors(self, *, params: bool = True, buffers: bool = False) -> list[torch.Tensor]:
        """Parameters and/or buffers to hand to the communicator: one flat span per dtype
        when they lie back to back (as ``DataParallel`` lays them out), else the tensors."""
        if not self.flat:
            return (self.params if params else []) + (self.buffers if buffers else [])
        key = (params, buffers)
        if key not in self._spans:
            chosen = (self.params if params else []) + (self.buffers if buffers else [])
            self._spans[key] = Spans(chosen)
        return self._spans[key].get()


class Synchronizer(Protocol):
    """The runtime half of an algorithm; see the module docstring."""

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


class AlgorithmConfig:
    """Base of the algorithm configs: name, dict round trip, bind."""

    name: ClassVar[str]

    def bind(self, ctx: SyncContext) -> Synchronizer:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self)
        return {"name": self.name, **dataclasses.asdict(self)}


_REGISTRY: dict[str, type[AlgorithmConfig]] = {}
C = TypeVar("C", bound=type[AlgorithmConfig])


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make the config buildable from ``{"name": name, ...}``."""

    def deco(cls: C) -> C:
        if name in _REGISTRY:
            raise ValueError(f"algorithm name {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    """Registered algorithm names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[AlgorithmConfig]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"algorithm name {name!r} is unknown; allowed: {names()}") from None


def build(spec: Mapping[str, Any] | AlgorithmConfig) -> AlgorithmConfig:
    """An algorithm config from a plain dict such as ``{"name": "local_sgd", "period": 8}``.

    Unknown keys and values of the wrong type raise ``ValueError`` naming the key.
    """
    if isinstance(spec, AlgorithmConfig):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"algorithm spec must be a mapping with a 'name' key, got {spec!r}")
    if "name" not in spec:
        raise ValueError(f"algorithm spec needs a 'name' key; allowed names: {names()}")
    cls = get(spec["name"])
    assert dataclasses.is_dataclass(cls)
    allowed = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in allowed:
            raise ValueError(f"algorithm {cls.name!r} has no field {key!r}; allowed: {sorted(allowed)}")
        kwargs[key] = _coerce(f"{cls.name}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(field: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's annotation; ints are accepted for floats."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{field} must be {wanted}, got {type(value).__name__} {value!r}")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


# -- validation helpers: every message names the field and what is allowed -----------------


def check_int(field: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")


def check_float(
    field: str,
    value: object,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = v == v and (v > low if low_open else v >= low)
        if ok and high is not None:
            ok = v < high if high_open else v <= high
    if not ok:
        left = "(" if low_open else "["
        right = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise ValueError(f"{field} must be a number in {left}{low}, {right}, got {value!r}")


def check_choice(field: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{field} must be one of {list(choices)}, got {value!r}")


def check_bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, got {value!r}")
