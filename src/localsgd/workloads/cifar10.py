"""CIFAR-10 with ResNet-20 (He et al. 2016, "Deep Residual Learning", section 4.2).

The data is read from the official python-version archive ``cifar-10-python.tar.gz`` (or
its extracted ``cifar-10-batches-py`` folder) at a path the user gives; nothing is
downloaded. Training batches get the standard augmentation — a random 32x32 crop of the
image zero-padded by 4 pixels, and a random horizontal flip — done with batched torch ops,
then per-channel normalization.

The batches are pickles; they are read with an unpickler that only admits the numpy array
reconstructors, so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import importlib
import io
import os
import pickle
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from localsgd.util.checks import ConfigError, check_int
from localsgd.workloads.base import VALIDATION_FRACTION, TensorWorkload, check_validation_fraction, register

NAME = "cifar10_resnet20"
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PADDING = 4
# He et al. 2016, section 4.2: 64k iterations of batch 128 (about 164 epochs of 50000
# images), learning rate divided by 10 at 32k and 48k iterations; 91.25% reported. Not
# measured here (no GPU).
RECIPE: dict[str, Any] = {
    "epochs": 164,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 1e-4,
    "lr_schedule": "step",
    "lr_milestones": [82, 123],
    "lr_decay": 0.1,
}
_EXPECTED = f"expected the python-version archive {ARCHIVE} or its extracted folder {FOLDER}/"


# -- reading the archive -------------------------------------------------------------------


_NUMPY_ARRAY_GLOBALS = frozenset({"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"})


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only the globals a pickled numpy array needs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes at protocol 2
            return codecs.encode
        if module.split(".")[0] == "numpy" and name in _NUMPY_ARRAY_GLOBALS:
            # numpy 2 moved numpy.core to numpy._core; old pickles (the official batches)
            # name the former.
            for candidate in (module.replace("numpy.core", "numpy._core", 1), module):
                try:
                    return getattr(importlib.import_module(candidate), name)
                except (ImportError, AttributeError):
                    continue
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_files(data_path: str | os.PathLike[str], batches: Sequence[str]) -> dict[str, bytes]:
    """The raw bytes of ``cifar-10-batches-py/<batch>`` for each batch, from the archive,
    the extracted folder, or a folder holding either."""
    path = Path(data_path)
    if not path.exists():
        raise ConfigError(f"workload.data_path '{data_path}' does not exist; {_EXPECTED}")
    if path.is_dir() and not (path / FOLDER).is_dir() and (path / ARCHIVE).is_file():
        path = path / ARCHIVE
    if path.is_dir():
        folder = path / FOLDER if (path / FOLDER).is_dir() else path  # or the folder itself
        found = {b: folder / b for b in batches if (folder / b).is_file()}
        _check_found(data_path, batches, found)
        return {b: f.read_bytes() for b, f in found.items()}
    try:
        with tarfile.open(path, "r:*") as tar:
            # Some repackaged archives prefix member names with "./".
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            found_members = {b: members[f"{FOLDER}/{b}"] for b in batches if f"{FOLDER}/{b}" in members}
            _check_found(data_path, batches, found_members)
            contents = {}
            for b, m in found_members.items():
                f = tar.extractfile(m)
                assert f is not None, m.name
                contents[b] = f.read()
            return contents
    except (tarfile.TarError, OSError, EOFError) as e:
        detail = " ".join(str(e).split())  # tarfile's messages span lines
        raise ConfigError(
            f"workload.data_path '{data_path}' is not a readable tar archive ({detail}); {_EXPECTED}"
        ) from None


def _check_found(
    data_path: str | os.PathLike[str], batches: Sequence[str], found: Mapping[str, object]
) -> None:
    missing = [b for b in batches if b not in found]
    if missing:
        raise ConfigError(f"workload.data_path '{data_path}' has no {FOLDER}/{missing[0]}; {_EXPECTED}")


def _load_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    try:
        content = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:
        detail = " ".join(str(e).split())
        raise ConfigError(
            f"workload.data_path: {where} is not a readable CIFAR-10 batch pickle ({detail}); {_EXPECTED}"
        ) from None
    return _parse_batch(content, where)


def _parse_batch(content: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    expected = "a dict with b'data' (uint8, N x 3072) and b'labels' (N integers in [0, 10))"
    if not isinstance(content, dict) or b"data" not in content or b"labels" not in content:
        got = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ConfigError(f"workload.data_path: {where} is malformed: expected {expected}, got {got}")
    data, labels = content[b"data"], np.asarray(content[b"labels"])
    ok = (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == int(np.prod(IMAGE_SHAPE))
        and labels.shape == (len(data),)
        and np.issubdtype(labels.dtype, np.integer)
        and (len(labels) == 0 or (labels.min() >= 0 and labels.max() < NUM_CLASSES))
    )
    if not ok:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise ConfigError(
            f"workload.data_path: {where} is malformed: expected {expected}, got data {dtype} {shape} "
            f"and {labels.shape[0] if labels.ndim else 'no'} labels"
        )
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values, each row by row.
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def load_arrays(data_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``x`` (50000, 3, 32, 32) uint8, ``y``, ``x_test`` (10000, ...), ``y_test``."""
    raw = _read_files(data_path, (*TRAIN_BATCHES, TEST_BATCH))
    batches = {b: _load_batch(content, f"{FOLDER}/{b} in '{data_path}'") for b, content in raw.items()}
    return {
        "x": np.concatenate([batches[b][0] for b in TRAIN_BATCHES]),
        "y": np.concatenate([batches[b][1] for b in TRAIN_BATCHES]),
        "x_test": batches[TEST_BATCH][0],
        "y_test": batches[TEST_BATCH][1],
    }


# -- preprocessing -------------------------------------------------------------------------


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> float32, scaled to [0, 1], then standardized per channel."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding of 4, in pixel space) and horizontal flip of a uint8 batch.

    The random draws come from ``generator`` on the CPU, so they are the same on any device.
    """
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * PADDING + 1, (2, n), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    padded = F.pad(x, (PADDING, PADDING, PADDING, PADDING))  # zeros: black borders
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping = reading columns backwards
    # Advanced indices around a slice put their dims first: (n, h, w, channels).
    crops = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def train_transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return normalize(augment(x, generator))


# -- ResNet-20 -----------------------------------------------------------------------------


class _PadShortcut(nn.Module):
    """Option A of He et al.: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and an identity shortcut (option A when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            assert stride == 2 and channels > in_channels, (stride, in_channels, channels)
            self.shortcut = _PadShortcut(channels - in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for CIFAR: a 3x3 conv, three stages of ``n`` basic blocks with 16, 32
    and 64 channels (the last two halve the resolution), global average pooling and a
    linear classifier. ``n = 3`` is ResNet-20 (0.27M parameters)."""

    def __init__(self, blocks_per_stage: int = 3, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_channels = 16
        for stage, channels in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = self.layers(h)
        return self.fc(h.mean((2, 3)))


def resnet20() -> ResNetCifar:
    return ResNetCifar(blocks_per_stage=3)


# -- registered workload -------------------------------------------------------------------


@dataclass(frozen=True)
class Cifar10Config:
    """``[workload]`` of ``cifar10_resnet20``."""

    data_path: str = ""
    """``cifar-10-python.tar.gz``, its extracted ``cifar-10-batches-py`` folder, or a folder
    holding either (required)."""
    num_samples: int | None = None
    """Train on the first N training images only (None: all 50000); the test split is
    always the full 10000."""
    validation_fraction: float = VALIDATION_FRACTION
    """The share of the (first N) training images held out for validation (never trained
    on; what searches, targets and early stops select on); 0 holds none out."""

    def __post_init__(self) -> None:
        if not self.data_path:
            raise ConfigError(
                f"workload.data_path is required: the path of {ARCHIVE} or its extracted folder"
            )
        if not Path(self.data_path).exists():
            raise ConfigError(f"workload.data_path '{self.data_path}' does not exist; {_EXPECTED}")
        if self.num_samples is not None:
            check_int("workload.num_samples", self.num_samples, 1, 50_000)
        check_validation_fraction("workload.validation_fraction", self.validation_fraction)


@register(NAME)
def cifar10_resnet20(config: Cifar10Config) -> TensorWorkload:
    """CIFAR-10 with ResNet-20; options in :class:`Cifar10Config`."""
    data_path, num_samples = config.data_path, config.num_samples
    arrays = load_arrays(data_path)
    if num_samples is not None:
        if num_samples > len(arrays["y"]):
            raise ConfigError(
                f"workload.num_samples must be <= {len(arrays['y'])} (the training images in "
                f"'{data_path}') or None, got {num_samples}"
            )
        arrays["x"], arrays["y"] = arrays["x"][:num_samples], arrays["y"][:num_samples]
    model_factory: Callable[[], nn.Module] = resnet20
    return TensorWorkload(
        name=NAME,
        num_classes=NUM_CLASSES,
        x_train=torch.from_numpy(np.ascontiguousarray(arrays["x"])),
        y_train=torch.from_numpy(arrays["y"]),
        x_test=torch.from_numpy(np.ascontiguousarray(arrays["x_test"])),
        y_test=torch.from_numpy(arrays["y_test"]),
        model_factory=model_factory,
        recipe=RECIPE,
        config={
            "data_path": str(data_path),
            "num_samples": num_samples,
            "validation_fraction": config.validation_fraction,
        },
        train_transform=train_transform,
        test_transform=normalize,
        validation_fraction=config.validation_fraction,
    )
