"""What every workload shares: the protocol, the registry, sharding, in-memory batching.

A workload is data + model + loss + evaluation behind one small interface
(:class:`Workload`), built by name from keyword options (:func:`build`). Workloads serve
studies and examples; algorithms never import them.

Sharding contract (identical for every workload and every algorithm): for a training seed
``s`` and an epoch ``e`` the permutation of the training indices is drawn from a
``torch.Generator`` seeded from ``(s, e)`` only; it is cut into ``world_size`` contiguous
shards of ``train_size // world_size`` samples (the tail is dropped) and rank ``r`` takes
shard ``r``. Every rank takes the same number of full batches, so collectives line up.
Random augmentation draws from a generator seeded from ``(s, e, r)``.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localsgd.algorithms.base import check_int

Device = torch.device | str
Batch = tuple[torch.Tensor, torch.Tensor]

# Domain tags keep the shuffle and augmentation streams apart (SeedSequence pads its
# entropy with zeros, so [s, e] and [s, e, 0] would otherwise collide).
_SHUFFLE_TAG = 0x5348
_AUGMENT_TAG = 0x4147


class Workload(Protocol):
    """Data, model, loss and evaluation of one training task."""

    name: str
    """The registry name, e.g. ``"mnist1d_cnn"``."""
    num_classes: int
    config: dict[str, Any]
    """The resolved build options (with ``name``): what a run record stores."""
    recipe: dict[str, Any]
    """The single-worker training recipe this workload is known to work with (plain
    values: ``epochs``, ``batch_size``, ``lr``, ``momentum``, ``nesterov``,
    ``weight_decay``, ``lr_schedule``, ...); a starting point for studies, not a rule."""

    @property
    def train_size(self) -> int: ...

    @property
    def test_size(self) -> int: ...

    def make_model(self, seed: int) -> nn.Module:
        """A fresh model on the CPU; the same ``seed`` gives the same initial parameters."""
        ...

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy."""
        ...

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        """Full batches each rank takes per epoch (the same on every rank)."""
        ...

    def train_batches(
        self, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, device: Device
    ) -> Iterator[Batch]:
        """This rank's batches of one epoch, on ``device``; see the module docstring."""
        ...

    def evaluate(self, model: nn.Module, device: Device, batch_size: int = 1000) -> dict[str, float]:
        """``{"test_loss", "test_accuracy"}`` over the full test split."""
        ...


# -- registry ------------------------------------------------------------------------------

Factory = Callable[..., Workload]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: make a factory with keyword-only options buildable as ``build(name, ...)``."""

    def deco(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"workload name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    """Registered workload names, sorted."""
    return sorted(_REGISTRY)


def options(name: str) -> dict[str, Any]:
    """The options a workload takes, with their defaults (``inspect.Parameter.empty`` if required)."""
    factory = _get(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()}


def build(name: str, **opts: Any) -> Workload:
    """The workload registered as ``name``, built from keyword options.

    An unknown name or option raises ``ValueError`` listing what is allowed; each workload
    validates its values (``ValueError`` naming the option).
    """
    allowed = options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"workload {name!r} has no option {unknown[0]!r}; allowed: {sorted(allowed)}")
    return _REGISTRY[name](**opts)


def _get(name: object) -> Factory:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"workload name {name!r} is unknown; allowed: {names()}")
    return _REGISTRY[name]


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
    _check_rank(rank, world_size)
    check_int("epoch", epoch, 0)
    check_int("seed", seed, 0)
    per_rank = num_samples // world_size
    perm = torch.randperm(num_samples, generator=shuffle_generator(seed, epoch))
    return perm[rank * per_rank : (rank + 1) * per_rank]


def _check_rank(rank: int, world_size: int) -> None:
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, {world_size}) for world_size {world_size}, got {rank}")


def cache_dir() -> Path:
    """Where generated data sets are cached: ``$XDG_CACHE_HOME/localsgd``, else ``~/.cache/localsgd``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "localsgd"


# -- the in-memory workload ----------------------------------------------------------------

TrainTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
TestTransform = Callable[[torch.Tensor], torch.Tensor]


class TensorWorkload:
    """A :class:`Workload` whose splits live in memory as tensors.

    ``train_transform(x, generator)`` turns a stored training batch into model input (CIFAR:
    uint8 -> augmented, normalized float); ``test_transform(x)`` does the same for
    evaluation. Without them the stored tensors are the inputs.
    """

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
    ) -> None:
        assert len(x_train) == len(y_train), (x_train.shape, y_train.shape)
        assert len(x_test) == len(y_test), (x_test.shape, y_test.shape)
        assert y_train.dtype == torch.long and y_test.dtype == torch.long, (y_train.dtype, y_test.dtype)
        self.name = name
        self.num_classes = num_classes
        self.config = {"name": name, **config}
        self.recipe = copy.deepcopy(recipe or {})
        self._splits = {"cpu": (x_train, y_train, x_test, y_test)}
        self._model_factory = model_factory
        self._train_transform = train_transform
        self._test_transform = test_transform

    @property
    def train_size(self) -> int:
        return len(self._splits["cpu"][0])

    @property
    def test_size(self) -> int:
        return len(self._splits["cpu"][2])

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "name")
        return f"<workload {self.name}({opts}): {self.train_size} train / {self.test_size} test>"

    def make_model(self, seed: int) -> nn.Module:
        check_int("seed", seed, 0)
        # A private RNG stream: the same seed gives the same model, and the caller's global
        # RNG state is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._model_factory()

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        check_int("world_size", world_size, 1)
        check_int("batch_size", batch_size, 1)
        per_rank = self.train_size // world_size
        if batch_size > per_rank:
            raise ValueError(
                f"batch_size must be <= {per_rank} (train_size {self.train_size} // world_size "
                f"{world_size}) for {self.name}, got {batch_size}"
            )
        return per_rank // batch_size

    def train_batches(
        self, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, device: Device
    ) -> Iterator[Batch]:
        _check_rank(rank, world_size)
        steps = self.steps_per_epoch(world_size, batch_size)
        shard = shard_indices(self.train_size, rank, world_size, epoch, seed)
        x_all, y_all, _, _ = self._on(device)
        order = shard[: steps * batch_size].to(x_all.device)
        generator = augment_generator(seed, epoch, rank) if self._train_transform else None
        # Validation above runs now; the batches are produced lazily.
        return self._batches(x_all, y_all, order.split(batch_size), generator)

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
            yield x, y_all[idx]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: Device, batch_size: int = 1000) -> dict[str, float]:
        check_int("batch_size", batch_size, 1)
        _, _, x_test, y_test = self._on(device)
        was_training = model.training
        model.eval()
        try:
            loss_sum = torch.zeros((), dtype=torch.float64, device=x_test.device)
            correct = torch.zeros((), dtype=torch.long, device=x_test.device)
            for start in range(0, len(x_test), batch_size):
                x = x_test[start : start + batch_size]
                y = y_test[start : start + batch_size]
                if self._test_transform is not None:
                    x = self._test_transform(x)
                logits = model(x)
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
                correct += (logits.argmax(1) == y).sum()
        finally:
            model.train(was_training)
        n = len(y_test)
        return {"test_loss": loss_sum.item() / n, "test_accuracy": correct.item() / n}

    def _on(self, device: Device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four split tensors on ``device``, copied there once and kept."""
        dev = torch.device(device)
        key = "cpu" if dev.type == "cpu" else str(dev)
        if key not in self._splits:
            self._splits[key] = tuple(t.to(dev) for t in self._splits["cpu"])  # type: ignore[assignment]
        return self._splits[key]
