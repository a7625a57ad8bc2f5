"""What every workload shares: the contract, declared metrics, the registry (names and
import paths), sharding, in-memory batching.

A workload is data + model + loss + metrics behind one small interface (:class:`Workload`),
built from its own validated config section (:func:`build`). A batch is a nest (mapping,
list, tuple) of tensors; the workload computes the loss from ``(model, batch)`` and
declares its metrics (:class:`Metric`) and which one is primary. Studies, engines and
examples use workloads; algorithms never do.

Sharding contract (identical for every built-in workload and every algorithm): for a
training seed ``s`` and an epoch ``e`` the permutation of the training indices is drawn from
a ``torch.Generator`` seeded from ``(s, e)`` only; it is cut into ``world_size`` contiguous
shards of ``train_size // world_size`` samples (the tail is dropped) and rank ``r`` takes
shard ``r``. Every rank takes the same number of full batches, so collectives line up.
Random augmentation draws from a generator seeded from ``(s, e, r)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import inspect
import os
import sys
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localsgd.records.record import Metric
from localsgd.util.checks import ConfigError, check_int, from_dict
from localsgd.util.nest import zip_nests

Device = torch.device | str
Batch = Any
"""A nest of tensors: a mapping (``{"x": ..., "y": ...}``), list or tuple, or one tensor."""

# Domain tags keep the shuffle and augmentation streams apart (SeedSequence pads its
# entropy with zeros, so [s, e] and [s, e, 0] would otherwise collide).
_SHUFFLE_TAG = 0x5348
_AUGMENT_TAG = 0x4147
_VALIDATION_TAG = 0x5641

SPLITS = ("validation", "test")
"""The evaluation splits: ``validation``, held out of the training data (what searches,
targets and early stops select on), and ``test`` (what is reported)."""
VALIDATION_FRACTION = 0.1
"""The default share of the training data a built-in workload holds out for validation."""


ACCURACY = Metric("accuracy", "test accuracy", "%", True, 100.0)
EVAL_LOSS = Metric("eval_loss", "eval loss", "", False)
TRAIN_ERROR = Metric("train_error", "training error", "%", False, 100.0)


@runtime_checkable
class Workload(Protocol):
    """Data, model, loss and metrics of one training task."""

    name: str
    """The name the run config used (registry name or import path)."""
    metrics: tuple[Metric, ...]
    """What :meth:`evaluate` reports, in display order."""
    primary: str
    """The name of the metric studies and reports lead with (and time-to-target uses)."""
    config: dict[str, Any]
    """The resolved build options: what a run record stores."""

    @property
    def train_size(self) -> int: ...

    def make_model(self, seed: int) -> nn.Module:
        """A fresh model on the CPU; the same ``seed`` gives the same initial parameters."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The mean training loss of ``model`` on ``batch`` (a scalar with a graph)."""
        ...

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Full batches each rank takes per epoch (the same on every rank)."""
        ...

    def train_batches(
        self, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, device: Device
    ) -> Iterator[Batch]:
        """This rank's batches of one epoch, on ``device``; shards a function of (seed,
        epoch, rank) alone."""
        ...

    def evaluate(self, model: nn.Module, device: Device, split: str = "test") -> dict[str, float]:
        """One value per declared metric, over ``split`` (one of :data:`SPLITS`): the
        held-out ``validation`` split or the ``test`` split."""
        ...

    @property
    def validation_size(self) -> int:
        """Examples held out of the training data for validation (0: none; then searches,
        targets and early stops can only select on test, and reports say so)."""
        ...


WORKLOAD_MEMBERS = (
    "metrics",
    "primary",
    "make_model",
    "loss",
    "steps_per_epoch",
    "train_batches",
    "evaluate",
)
"""What a workload must have; ``validation_size`` is optional (see :func:`validation_size`)."""


def check_workload(obj: object, where: str) -> Workload:
    """``obj`` if it keeps the :class:`Workload` contract, else a ``ConfigError`` naming
    ``where`` (the factory) and what is missing."""
    missing = [m for m in WORKLOAD_MEMBERS if not hasattr(obj, m)]
    if missing:
        raise ConfigError(
            f"{where} returned {type(obj).__name__}, not a workload: it lacks {', '.join(missing)} "
            "(see localsgd.workloads.Workload)"
        )
    workload: Any = obj
    metrics = tuple(workload.metrics)
    if not metrics or not all(isinstance(m, Metric) for m in metrics):
        raise ConfigError(f"{where} returned a workload whose metrics are not a non-empty tuple of Metric")
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} returned a workload with duplicate metric names {names}")
    if workload.primary not in names:
        raise ConfigError(
            f"{where} returned a workload whose primary {workload.primary!r} is not one of {names}"
        )
    return workload


Stream = tuple[int, int, int]
"""One replica's stream of training batches: ``(rank, world_size, seed)``."""


def stacked_train_batches(
    workload: Workload, streams: Sequence[Stream], batch_size: int, epoch: int, device: Device
) -> Iterator[Batch]:
    """The batches of one epoch of several replicas' streams, step by step, stacked: each
    a nest of tensors with a leading dimension over ``streams`` (their order), equal to
    ``train_batches`` of each stream zipped and stacked. A workload whose class has a
    ``stacked_train_batches`` method (:class:`TensorWorkload`: one gather per step instead
    of one per stream, and one stack) produces them; any other, stream by stream (a
    wrapper that hands other attributes to a workload inside has its own
    ``train_batches`` used, not the inner workload's stacked batches)."""
    own = getattr(type(workload), "stacked_train_batches", None)
    if own is not None:
        return cast(Iterator[Batch], own(workload, streams, batch_size, epoch, device))
    return _stacked_one_by_one(workload, streams, batch_size, epoch, device)


def _stacked_one_by_one(
    workload: Workload, streams: Sequence[Stream], batch_size: int, epoch: int, device: Device
) -> Iterator[Batch]:
    """Each stream's ``train_batches``, zipped, each step's batches stacked."""
    batches = [workload.train_batches(r, w, batch_size, epoch, seed, device) for r, w, seed in streams]
    for group in zip(*batches):
        yield zip_nests(torch.stack, list(group))


def validation_size(workload: Workload) -> int:
    """The workload's validation examples: 0 for a workload of the user's that declares no
    ``validation_size`` (its ``evaluate`` is then only ever asked for ``test``)."""
    return int(getattr(workload, "validation_size", 0) or 0)


def evaluate(workload: Workload, model: nn.Module, device: Device, split: str = "test") -> dict[str, float]:
    """``workload.evaluate`` on ``split``; a workload of the user's that holds no validation
    split out is only ever asked for test, the way its ``evaluate(model, device)`` was
    written."""
    if check_split(split) == "test":
        return workload.evaluate(model, device)
    if not validation_size(workload):
        raise ValueError(f"workload {workload.name!r} holds out no validation split (validation_size 0)")
    return workload.evaluate(model, device, split)


def metric(workload: Workload, name: str | None = None) -> Metric:
    """The declared metric ``name`` (default: the primary one)."""
    wanted = workload.primary if name is None else name
    for m in workload.metrics:
        if m.name == wanted:
            return m
    raise ValueError(
        f"workload {workload.name!r} has no metric {wanted!r}; allowed: {[m.name for m in workload.metrics]}"
    )


# -- registry and import paths -------------------------------------------------------------

Factory = Callable[..., Workload]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make ``factory`` buildable by ``name``. The factory takes its options as
    one frozen dataclass parameter (its config section) or as keyword parameters."""

    def deco(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"workload name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    """Registered workload names, sorted."""
    return sorted(_REGISTRY)


def resolve(name: object, key: str = "workload") -> Factory:
    """The factory of a registered name or of an import path ``package.module:function``.

    The current directory is importable, as for ``python -m``. ``ConfigError`` naming
    ``key`` for an unknown name, a module that does not import, or a missing function.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{key} must be a registered name {names()} or 'package.module:function', got {name!r}"
        )
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise ConfigError(
            f"{key} = {name!r} is not a registered workload {names()} nor an import path 'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key} = {name!r}: an import path is 'package.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"{key} = {name!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"{key} = {name!r}: module {module_name!r} has no {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"{key} = {name!r}: {attr!r} is a {type(factory).__name__}, not a function")
    return factory


def options_class(factory: Factory) -> tuple[type, bool]:
    """The config section a factory takes: ``(dataclass, True)`` for a factory of one
    dataclass parameter, else a dataclass made from its keyword parameters and False."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return dataclasses.make_dataclass("Options", [], frozen=True), False
    try:
        hints = typing.get_type_hints(factory)
    except Exception:
        hints = {}
    params = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(params) == 1 and dataclasses.is_dataclass(hints.get(params[0].name)):
        return hints[params[0].name], True
    fields: list[tuple[Any, ...]] = []
    for p in params:
        hint = hints.get(p.name, Any)
        if p.default is p.empty:
            fields.append((p.name, hint))
        else:
            fields.append((p.name, hint, dataclasses.field(default=p.default)))
    fields.sort(key=lambda f: len(f) == 3)  # required before defaulted, as dataclasses want
    return dataclasses.make_dataclass(
        f"{getattr(factory, '__name__', 'workload')}_options", fields, frozen=True
    ), False


def split_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"mnist1d_cnn"`` or ``{"name": ..., **options}`` -> (name, options)."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(
            "workload must be a name or import path, or a table with a 'name' key and the "
            f"workload's options, got {spec!r}"
        )
    return spec["name"], {k: v for k, v in spec.items() if k != "name"}


def check_spec(spec: str | Mapping[str, Any], key: str = "workload") -> tuple[Factory, Any, bool]:
    """Resolve the factory and validate the options without building anything (no data
    is read): ``(factory, options, takes_dataclass)``; ``ConfigError`` naming the key."""
    name, options = split_spec(spec)
    factory = resolve(name, key)
    cls, takes_dataclass = options_class(factory)
    return factory, from_dict(cls, options, key), takes_dataclass


def build(spec: str | Mapping[str, Any], /, **options: Any) -> Workload:
    """The workload of ``spec`` (a registered name, an import path ``package.module:function``,
    or a table ``{"name": ..., **options}``), with keyword ``options`` on top.

    Unknown options, values of the wrong type and factories that return no workload raise
    :class:`ConfigError` (a ``ValueError``) naming the key; each workload validates its own
    values (and data paths) too.
    """
    name, given = split_spec(spec)
    factory, opts, takes_dataclass = check_spec({"name": name, **given, **options})
    if takes_dataclass:
        result = factory(opts)
    else:
        result = factory(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})
    workload = check_workload(result, f"workload = {name!r}")
    with contextlib.suppress(AttributeError):  # a read-only name stays as the workload has it
        workload.name = name  # the name the config used (import paths included)
    return workload


# -- seeds and sharding --------------------------------------------------------------------


def derive_seed(tag: int, *parts: int) -> int:
    """A 63-bit generator seed mixed from non-negative integers (numpy's SeedSequence)."""
    state = np.random.SeedSequence([tag, *parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s permutation: seeded from ``(seed, epoch)`` only."""
    return torch.Generator().manual_seed(derive_seed(_SHUFFLE_TAG, seed, epoch))


def augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of rank ``rank``'s augmentation in epoch ``epoch``."""
    return torch.Generator().manual_seed(derive_seed(_AUGMENT_TAG, seed, epoch, rank))


def shard_indices(num_samples: int, rank: int, world_size: int, epoch: int, seed: int) -> torch.Tensor:
    """Rank ``rank``'s training indices for one epoch (see the module docstring).

    Shards of different ranks are disjoint, have ``num_samples // world_size`` entries each,
    and together cover that many times ``world_size`` samples.
    """
    check_int("num_samples", num_samples, 1)
    check_rank(rank, world_size)
    check_int("epoch", epoch, 0)
    check_int("seed", seed, 0)
    per_rank = num_samples // world_size
    perm = torch.randperm(num_samples, generator=shuffle_generator(seed, epoch))
    return perm[rank * per_rank : (rank + 1) * per_rank]


def full_batches(name: str, train_size: int, world_size: int, batch_size: int) -> int:
    """Full batches of ``batch_size`` each rank takes per epoch from its shard (see the
    module docstring); ``ValueError`` when a shard is smaller than one batch."""
    check_int("world_size", world_size, 1)
    check_int("batch_size", batch_size, 1)
    per_rank = train_size // world_size
    if batch_size > per_rank:
        raise ValueError(
            f"batch_size must be <= {per_rank} (train_size {train_size} // world_size "
            f"{world_size}) for {name}, got {batch_size}"
        )
    return per_rank // batch_size


def check_rank(rank: int, world_size: int) -> None:
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, {world_size}) for world_size {world_size}, got {rank}")


def check_split(split: object) -> str:
    """``split`` if it is one of :data:`SPLITS`, else a ``ValueError`` naming the allowed ones."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return str(split)


def check_validation_fraction(key: str, fraction: object) -> float:
    """``fraction`` as a float in [0, 0.5] (0: no validation split), else a ``ConfigError``
    naming ``key``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 0.5:
        raise ConfigError(
            f"{key} must be a number in [0, 0.5] (the share of the training data held out for "
            f"validation; 0: none), got {fraction!r}"
        )
    return float(fraction)


def validation_split(num_samples: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) of ``num_samples`` training examples, each
    sorted: ``round(fraction * num_samples)`` of them held out for validation (at least one
    when ``fraction`` > 0), drawn by a permutation seeded from ``num_samples`` alone. The
    split never depends on a run's seed, so every run of a study, whatever its seed,
    trains on the same examples and is selected on the same held-out ones."""
    check_int("num_samples", num_samples, 1)
    held = 0 if fraction <= 0 else min(num_samples - 1, max(1, round(fraction * num_samples)))
    generator = torch.Generator().manual_seed(derive_seed(_VALIDATION_TAG, num_samples))
    perm = torch.randperm(num_samples, generator=generator)
    return perm[held:].sort().values, perm[:held].sort().values


def cache_dir() -> Path:
    """Where generated data sets are cached: ``$XDG_CACHE_HOME/localsgd``, else ``~/.cache/localsgd``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "localsgd"


# -- the in-memory workload ----------------------------------------------------------------

TrainTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
TestTransform = Callable[[torch.Tensor], torch.Tensor]


class TensorWorkload:
    """A classification :class:`Workload` whose splits live in memory as tensors; batches
    are ``{"x": inputs, "y": labels}``, the loss is the mean cross-entropy, and the metrics
    are accuracy (primary) and eval loss (and, with ``train_error``, the error on the
    training split), on the held-out validation split or on the test split.

    ``validation_fraction`` of the given training examples are held out for validation
    (:func:`validation_split`: the same examples for every run of a data set) and never
    trained on.

    ``train_transform(x, generator)`` turns a stored training batch into model input (CIFAR:
    uint8 -> augmented, normalized float); ``test_transform(x)`` does the same for
    evaluation. Without them the stored tensors are the inputs.
    """

    metrics: tuple[Metric, ...] = (ACCURACY, EVAL_LOSS)
    primary: str = "accuracy"
    eval_batch_size = 1000

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        model_factory: Callable[[], nn.Module],
        config: dict[str, Any],
        recipe: dict[str, Any] | None = None,
        train_transform: TrainTransform | None = None,
        test_transform: TestTransform | None = None,
        train_error: bool = False,
        validation_fraction: float = VALIDATION_FRACTION,
    ) -> None:
        assert len(x_train) == len(y_train), (x_train.shape, y_train.shape)
        assert len(x_test) == len(y_test), (x_test.shape, y_test.shape)
        assert y_train.dtype == torch.long and y_test.dtype == torch.long, (y_train.dtype, y_test.dtype)
        self.name = name
        self.num_classes = num_classes
        self.config = dict(config)
        self.recipe = copy.deepcopy(recipe or {})
        kept, held = validation_split(len(x_train), validation_fraction)
        if len(held) == 0:
            # No split: nothing is copied (a large training set stays one tensor).
            splits = (x_train, y_train, x_train[:0], y_train[:0], x_test, y_test)
        else:
            splits = (x_train[kept], y_train[kept], x_train[held], y_train[held], x_test, y_test)
        self._splits = {"cpu": splits}
        self._model_factory = model_factory
        self._train_transform = train_transform
        self._test_transform = test_transform
        if train_error:
            self.metrics = (*self.metrics, TRAIN_ERROR)

    @property
    def train_size(self) -> int:
        return len(self._splits["cpu"][0])

    @property
    def validation_size(self) -> int:
        return len(self._splits["cpu"][2])

    @property
    def test_size(self) -> int:
        return len(self._splits["cpu"][4])

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return (
            f"<workload {self.name}({opts}): {self.train_size} train / {self.validation_size} validation / "
            f"{self.test_size} test>"
        )

    def make_model(self, seed: int) -> nn.Module:
        check_int("seed", seed, 0)
        # A private RNG stream: the same seed gives the same model, and the caller's global
        # RNG state is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._model_factory()

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"])

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        return full_batches(self.name, self.train_size, world_size, batch_size)

    def train_batches(
        self, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, device: Device
    ) -> Iterator[Batch]:
        check_rank(rank, world_size)
        steps = self.steps_per_epoch(world_size, batch_size)
        shard = shard_indices(self.train_size, rank, world_size, epoch, seed)
        x_all, y_all = self._on(device)[:2]
        order = shard[: steps * batch_size].to(x_all.device)
        generator = augment_generator(seed, epoch, rank) if self._train_transform else None
        # Validation above runs now; the batches are produced lazily.
        return self._batches(x_all, y_all, order.split(batch_size), generator)

    def stacked_train_batches(
        self, streams: Sequence[Stream], batch_size: int, epoch: int, device: Device
    ) -> Iterator[Batch]:
        """:func:`stacked_train_batches`: each step's samples of every stream taken by one
        index ``[S, B]``; stream by stream with a train transform (which draws per stream)
        or where ``train_batches`` is not this class's own (a subclass's, or one set on the
        instance), which the streams' batches then come from."""
        own = getattr(self.train_batches, "__func__", None) is TensorWorkload.train_batches
        if self._train_transform is not None or not own:
            return _stacked_one_by_one(self, streams, batch_size, epoch, device)
        x_all, y_all = self._on(device)[:2]
        shards, lengths = [], []
        for rank, world_size, seed in streams:
            check_rank(rank, world_size)
            lengths.append(self.steps_per_epoch(world_size, batch_size))
            shards.append(shard_indices(self.train_size, rank, world_size, epoch, seed))
        steps = min(lengths, default=0)  # zipped streams stop with the shortest
        if steps == 0:
            return iter(())
        # [S, steps, B]: stream s's batch t is its shard's t-th chunk of B, as train_batches splits it.
        order = torch.stack([s[: steps * batch_size] for s in shards]).view(len(shards), steps, batch_size)
        return self._gathered(x_all, y_all, order.to(x_all.device))

    @staticmethod
    def _gathered(x_all: torch.Tensor, y_all: torch.Tensor, order: torch.Tensor) -> Iterator[Batch]:
        for step in range(order.shape[1]):
            idx = order[:, step]
            yield {"x": x_all[idx], "y": y_all[idx]}

    def _batches(
        self,
        x_all: torch.Tensor,
        y_all: torch.Tensor,
        chunks: tuple[torch.Tensor, ...],
        generator: torch.Generator | None,
    ) -> Iterator[Batch]:
        for idx in chunks:
            x = x_all[idx]
            if self._train_transform is not None:
                assert generator is not None
                x = self._train_transform(x, generator)
            yield {"x": x, "y": y_all[idx]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: Device, split: str = "test") -> dict[str, float]:
        """Accuracy and mean cross-entropy over the whole ``split`` (``validation`` or
        ``test``); with ``train_error``, the error over the whole training split too
        (without augmentation; with ``test`` only). ``ValueError`` for the validation split of a workload that
        holds none out."""
        check_split(split)
        x_train, y_train, x_val, y_val, x_test, y_test = self._on(device)
        x_eval, y_eval = (x_val, y_val) if split == "validation" else (x_test, y_test)
        if len(y_eval) == 0:
            raise ValueError(f"{self.name} holds out no validation split (validation_fraction = 0)")
        was_training = model.training
        model.eval()
        try:
            correct, loss_sum = self._score(model, x_eval, y_eval)
            out = {"accuracy": correct / len(y_eval), "eval_loss": loss_sum / len(y_eval)}
            # The training split's error is the same whichever split is asked for: once, with test.
            if split == "test" and any(m.name == TRAIN_ERROR.name for m in self.metrics):
                train_correct, _ = self._score(model, x_train, y_train)
                out[TRAIN_ERROR.name] = 1.0 - train_correct / len(y_train)
        finally:
            model.train(was_training)
        return out

    def _score(self, model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor) -> tuple[int, float]:
        """Correct predictions and summed cross-entropy over a split, in eval batches."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=x_all.device)
        correct = torch.zeros((), dtype=torch.long, device=x_all.device)
        for start in range(0, len(x_all), self.eval_batch_size):
            x = x_all[start : start + self.eval_batch_size]
            y = y_all[start : start + self.eval_batch_size]
            if self._test_transform is not None:
                x = self._test_transform(x)
            logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
        return int(correct.item()), float(loss_sum.item())

    def _on(self, device: Device) -> tuple[torch.Tensor, ...]:
        """The six split tensors (x and y of train, validation, test) on ``device``, copied
        there once and kept."""
        dev = torch.device(device)
        key = "cpu" if dev.type == "cpu" else str(dev)
        if key not in self._splits:
            self._splits[key] = tuple(t.to(dev) for t in self._splits["cpu"])  # type: ignore[assignment]
        return self._splits[key]
