"""The ImageNet workloads: ResNet-50 and ResNet-101 v1.5 on an ImageNet-format folder.

Training images get the "Inception" random resized crop (area share 0.08–1, aspect ratio
3/4–4/3) to ``image_size`` and a random horizontal flip; evaluation images are resized to a
shorter side of ``eval_resize`` and centre-cropped to ``image_size``. Both are decoded with
Pillow in ``loader_workers`` DataLoader processes and normalized with ImageNet's channel
statistics on the device (uint8 crosses to the device: a quarter of float32's bytes).
Each image's random draws come from ``(seed, epoch, rank, position)``, so batches are the
same however many workers decode them. Shards follow :mod:`localsgd.workloads.base`.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from localsgd.records.record import Metric
from localsgd.util.checks import ConfigError, check_int
from localsgd.workloads.base import (
    EVAL_LOSS,
    VALIDATION_FRACTION,
    Batch,
    Device,
    check_rank,
    check_split,
    check_validation_fraction,
    full_batches,
    register,
    shard_indices,
    validation_split,
)
from localsgd.workloads.imagenet import data
from localsgd.workloads.imagenet.resnet import resnet50, resnet101

TOP1 = Metric("accuracy", "top-1 accuracy", "%", True, 100.0)
TOP5 = Metric("top5_accuracy", "top-5 accuracy", "%", True, 100.0)
# Goyal et al. 2017 (batch 256 on 8 workers of 32): 90 epochs, lr 0.1 per 256 images,
# divided by 10 at epochs 30, 60 and 80; ~76.3% top-1 for ResNet-50. Not measured here.
RECIPE: dict[str, Any] = {
    "epochs": 90,
    "batch_size": 256,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 1e-4,
    "lr_schedule": "step",
    "lr_milestones": [30, 60, 80],
    "lr_decay": 0.1,
}
MAX_AUTO_WORKERS = 8


def default_workers() -> int:
    """Loader processes when not given: all cores but one (the training process), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_AUTO_WORKERS, max(0, cores - 1))


@dataclass(frozen=True)
class ImageNetConfig:
    """``[workload]`` of ``imagenet_resnet50`` and ``imagenet_resnet101``."""

    data_path: str = ""
    """The folder holding ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (or a flat
    ``val/`` with ``val_labels``) (required)."""
    val_labels: str | None = None
    """A file of ``FILENAME WNID`` lines (space or comma separated) labelling a flat ``val/``."""
    image_size: int = 224
    """The side of the square crops the model sees."""
    eval_resize: int = 256
    """Evaluation images' shorter side before the centre crop (>= ``image_size``)."""
    loader_workers: int | None = None
    """DataLoader processes decoding images (0: decode in the training process; None: all
    cores but one, at most 8)."""
    cache: str | None = None
    """A folder for a pre-resized, memory-mapped copy of the data (built on first use)."""
    cache_size: int = 160
    """The shorter side of cached images, in [32, 1024] (below ``image_size``, crops are upsampled)."""
    zero_init_residual: bool = True
    """Start each residual block's last BatchNorm γ at 0 (Goyal et al. 2017)."""
    validation_fraction: float = VALIDATION_FRACTION
    """The share of the training images held out for validation (0: none)."""

    def __post_init__(self) -> None:
        if not self.data_path:
            raise ConfigError("workload.data_path is required: a folder holding train/<wnid>/ and val/")
        if self.val_labels is not None and not Path(self.val_labels).is_file():
            raise ConfigError(f"workload.val_labels '{self.val_labels}' is not a file")
        check_int("workload.image_size", self.image_size, 8, 1024)
        check_int("workload.eval_resize", self.eval_resize, self.image_size, 2048)
        if self.loader_workers is not None:
            check_int("workload.loader_workers", self.loader_workers, 0, 256)
        check_int("workload.cache_size", self.cache_size, 32, 1024)
        if not isinstance(self.zero_init_residual, bool):
            raise ConfigError(
                f"workload.zero_init_residual must be true or false, got {self.zero_init_residual!r}"
            )
        check_validation_fraction("workload.validation_fraction", self.validation_fraction)


class _TrainItems(Dataset):
    """One rank's shard of one epoch, augmented: item ``j`` is image ``order[j]``."""

    def __init__(
        self,
        source: data.Source,
        labels: torch.Tensor,
        order: torch.Tensor,
        size: int,
        key: tuple[int, int, int],
    ) -> None:
        self.source, self.labels, self.order, self.size, self.key = source, labels, order, size, key

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(self.order[j])
        generator = data.image_generator(*self.key, j)
        return data.train_view(self.source.image(i), self.size, generator), self.labels[i]


class _EvalItems(Dataset):
    def __init__(
        self, source: data.Source, labels: torch.Tensor, indices: torch.Tensor, size: int, resize: int
    ) -> None:
        self.source, self.labels, self.indices, self.size, self.resize = source, labels, indices, size, resize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(self.indices[j])
        return data.eval_view(self.source.image(i), self.size, self.resize), self.labels[i]


class ImageNetWorkload:
    """An image-classification :class:`~localsgd.workloads.Workload` on an ImageNet-format
    folder; batches are ``{"x": float32 (N, 3, S, S), "y": int64 (N,)}``, the loss is the mean
    cross-entropy, metrics are top-1 accuracy (primary), top-5 accuracy and eval loss, on
    the validation split (held out of ``train/``) or the test split (``val/``)."""

    metrics: tuple[Metric, ...] = (TOP1, TOP5, EVAL_LOSS)
    primary: str = "accuracy"
    eval_batch_size = 250

    def __init__(self, name: str, config: ImageNetConfig, model_factory: Callable[[int], nn.Module]) -> None:
        self.name = name
        self.options = config
        self.config: dict[str, Any] = {k: getattr(config, k) for k in config.__dataclass_fields__}
        self.recipe = copy.deepcopy(RECIPE)
        self.wnids, train, test = data.scan(config.data_path, config.val_labels)
        self.num_classes = len(self.wnids)
        self._model_factory = model_factory
        self.workers = default_workers() if config.loader_workers is None else config.loader_workers
        self._labels = {"train": torch.tensor(train.labels), "test": torch.tensor(test.labels)}
        self._sources: dict[str, data.Source]
        if config.cache is not None:
            self._sources = dict(data.cached(config.cache, {"train": train, "test": test}, config.cache_size))
        else:
            self._sources = {"train": data.JpegSource(train), "test": data.JpegSource(test)}
        self._kept, self._held = validation_split(len(train), config.validation_fraction)

    @property
    def train_size(self) -> int:
        return len(self._kept)

    @property
    def validation_size(self) -> int:
        return len(self._held)

    @property
    def test_size(self) -> int:
        return len(self._labels["test"])

    def __repr__(self) -> str:
        return (
            f"<workload {self.name}({self.options.data_path!r}): {self.num_classes} classes, "
            f"{self.train_size} train / {self.validation_size} validation / {self.test_size} test>"
        )

    def make_model(self, seed: int) -> nn.Module:
        check_int("seed", seed, 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._model_factory(self.num_classes)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"])

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        return full_batches(self.name, self.train_size, world_size, batch_size)

    def train_batches(
        self, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, device: Device
    ) -> Iterator[Batch]:
        order = self.train_indices(rank, world_size, batch_size, epoch, seed)
        items = _TrainItems(
            self._sources["train"], self._labels["train"], order, self.options.image_size, (seed, epoch, rank)
        )
        return self._batches(self._loader(items, batch_size, device), device)

    def train_indices(
        self, rank: int, world_size: int, batch_size: int, epoch: int, seed: int
    ) -> torch.Tensor:
        """The ``train/`` images (positions in the sorted file list) rank ``rank`` trains on
        in epoch ``epoch``, in batch order: its shard of the images not held out."""
        check_rank(rank, world_size)
        steps = self.steps_per_epoch(world_size, batch_size)
        shard = shard_indices(self.train_size, rank, world_size, epoch, seed)
        return self._kept[shard[: steps * batch_size]]

    @property
    def validation_indices(self) -> torch.Tensor:
        """The ``train/`` images held out for validation."""
        return self._held

    def _loader(self, items: Dataset, batch_size: int, device: Device) -> DataLoader:
        workers = self.workers
        return DataLoader(
            items,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=torch.device(device).type == "cuda",
            prefetch_factor=4 if workers else None,
        )

    @staticmethod
    def _batches(loader: DataLoader, device: Device) -> Iterator[Batch]:
        dev = torch.device(device)
        for x, y in loader:
            # Pinned host memory lets these copies overlap the previous step's compute.
            x = x.to(dev, non_blocking=True)
            yield {"x": data.normalize(x), "y": y.to(dev, non_blocking=True)}

    def eval_batches(self, split: str, device: Device) -> Iterator[Batch]:
        """The evaluation batches of ``split`` (centre crops, normalized), in order."""
        if check_split(split) == "validation":
            source, labels, indices = self._sources["train"], self._labels["train"], self._held
        else:
            source, labels = self._sources["test"], self._labels["test"]
            indices = torch.arange(len(labels))
        opts = self.options
        items = _EvalItems(source, labels, indices, opts.image_size, opts.eval_resize)
        return self._batches(self._loader(items, self.eval_batch_size, device), device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: Device, split: str = "test") -> dict[str, float]:
        """Top-1 and top-5 accuracy and mean cross-entropy over the whole ``split``."""
        if check_split(split) == "validation" and not self.validation_size:
            raise ValueError(f"{self.name} holds out no validation split (validation_fraction = 0)")
        was_training = model.training
        model.eval()
        top1 = top5 = 0
        loss_sum, count = 0.0, 0
        try:
            for batch in self.eval_batches(split, device):
                logits = model(batch["x"]).float()
                y = batch["y"]
                best = logits.topk(min(5, logits.shape[1]), dim=1).indices
                top1 += int((best[:, 0] == y).sum())
                top5 += int((best == y[:, None]).any(1).sum())
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                count += len(y)
        finally:
            model.train(was_training)
        return {"accuracy": top1 / count, "top5_accuracy": top5 / count, "eval_loss": loss_sum / count}


def _existing(config: ImageNetConfig) -> ImageNetConfig:
    """The data folder is looked for when the workload is built, not when its options are
    checked: a study's dry run plans ImageNet runs on a machine without ImageNet."""
    if not Path(config.data_path).is_dir():
        raise ConfigError(f"workload.data_path '{config.data_path}' is not a folder")
    return config


def _resnet(arch: Callable[..., nn.Module], zero_init_residual: bool, num_classes: int) -> nn.Module:
    return arch(num_classes, zero_init_residual=zero_init_residual)


@register("imagenet_resnet50")
def imagenet_resnet50(config: ImageNetConfig) -> ImageNetWorkload:
    """ImageNet with ResNet-50 v1.5; options in :class:`ImageNetConfig`."""
    factory = functools.partial(_resnet, resnet50, config.zero_init_residual)
    return ImageNetWorkload("imagenet_resnet50", _existing(config), factory)


@register("imagenet_resnet101")
def imagenet_resnet101(config: ImageNetConfig) -> ImageNetWorkload:
    """ImageNet with ResNet-101 v1.5; options in :class:`ImageNetConfig`."""
    factory = functools.partial(_resnet, resnet101, config.zero_init_residual)
    return ImageNetWorkload("imagenet_resnet101", _existing(config), factory)
