"""MNIST-1D (Greydanus 2020): ten 1-D templates of length 40, randomly padded, translated,
scaled, sheared and noised. Small enough to train in seconds on a CPU, and it separates
model classes: on 16000 training samples the CNN here passes 90% test accuracy after one
epoch and reaches 97.5-98% in five, while the MLP reaches ~80% in ten.

The data set is generated locally with ``mnist1d.data.make_dataset`` (never
``get_dataset``, which downloads) and cached as ``.npz`` under :func:`cache_dir`, keyed by
``num_samples`` and the generation ``seed`` (file name and format match the cache of
``examples/quickstart.py``, so either fills it for the other).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from localsgd.util.checks import ConfigError, check_bool, check_directory, check_int
from localsgd.util.files import atomic_path
from localsgd.workloads.base import (
    VALIDATION_FRACTION,
    TensorWorkload,
    cache_dir,
    check_validation_fraction,
    register,
)

logger = logging.getLogger(__name__)

SEQUENCE_LENGTH = 40
NUM_CLASSES = 10
TRAIN_SPLIT = 0.8  # mnist1d's default; 20000 samples -> 16000 train / 4000 test
DEFAULT_NUM_SAMPLES = 20000
DEFAULT_SEED = 42  # mnist1d's own default generation seed
_KEYS = ("x", "y", "x_test", "y_test")

# Measured with one worker on 20000 samples (16000 train), 2 CPU cores, one thread: the CNN
# reaches 97.5-98.1% test accuracy (seeds 0-4) in ~2.5 s of training; 90% after the first
# epoch. The MLP reaches 80% in 10 epochs (83% after 30 at lr 0.05).
CNN_RECIPE: dict[str, Any] = {
    "epochs": 5,
    "batch_size": 64,
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "lr_schedule": "cosine",
}
MLP_RECIPE: dict[str, Any] = {**CNN_RECIPE, "epochs": 10}
FC_RECIPE: dict[str, Any] = {
    **MLP_RECIPE,
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "lr_schedule": "constant",
}


# -- data ----------------------------------------------------------------------------------


def cache_path(num_samples: int, seed: int, directory: str | os.PathLike[str] | None = None) -> Path:
    """The cache file of one generated data set."""
    root = cache_dir() if directory is None else Path(directory)
    return root / f"mnist1d_n{num_samples}_seed{seed}.npz"


def load_arrays(
    num_samples: int, seed: int, directory: str | os.PathLike[str] | None = None
) -> dict[str, np.ndarray]:
    """Arrays ``x, y, x_test, y_test``: read from the cache, or generated and cached."""
    path = cache_path(num_samples, seed, directory)
    if path.exists():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in _KEYS}
            _check_arrays(arrays, num_samples)
            return arrays
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            logger.warning("mnist1d: unreadable cache %s (%s); generating again", path, e)
    arrays = generate(num_samples, seed)
    _write_atomically(path, arrays)
    return arrays


def generate(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with the package's default arguments (a few seconds for 20000)."""
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset reseeds the global `random` and numpy RNGs; give the caller theirs back.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = mnist1d.data.make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {k: np.asarray(data[k]) for k in _KEYS}
    _check_arrays(arrays, num_samples)
    return arrays


def _check_arrays(arrays: dict[str, np.ndarray], num_samples: int) -> None:
    n = (num_samples // NUM_CLASSES) * NUM_CLASSES  # make_dataset draws whole classes
    n_train = int(n * TRAIN_SPLIT)
    want = {
        "x": (n_train, SEQUENCE_LENGTH),
        "y": (n_train,),
        "x_test": (n - n_train, SEQUENCE_LENGTH),
        "y_test": (n - n_train,),
    }
    for key, shape in want.items():
        if arrays[key].shape != shape:
            raise ValueError(f"mnist1d array {key!r} has shape {arrays[key].shape}, expected {shape}")


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Several ranks may generate at once: each writes a private file, then renames it.
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez(tmp, x=arrays["x"], y=arrays["y"], x_test=arrays["x_test"], y_test=arrays["y_test"])


# -- models --------------------------------------------------------------------------------


class ConvNet1D(nn.Module):
    """Three strided 1-D convolutions (kernel 5, 3, 3; stride 2; 32 channels), each followed
    by BatchNorm and ReLU, then a linear classifier on the flattened 32 x 5 features: 8,106
    parameters. The MNIST-1D paper's CNN, with BatchNorm, which makes it reach 90% within
    one or two epochs of 16000 samples and tolerate learning rates from 0.05 to 0.2.

    ``batch_norm=False`` gives the plain variant (biases instead of BatchNorm, 8,010
    parameters; slower to train and unstable at learning rates above ~0.1).
    """

    def __init__(self, channels: int = 32, classes: int = NUM_CLASSES, batch_norm: bool = True) -> None:
        super().__init__()

        def layer(c_in: int, kernel: int) -> list[nn.Module]:
            conv = nn.Conv1d(c_in, channels, kernel, stride=2, padding=1, bias=not batch_norm)
            return [conv, nn.BatchNorm1d(channels), nn.ReLU()] if batch_norm else [conv, nn.ReLU()]

        self.features = nn.Sequential(
            *layer(1, 5),  # length 40 -> 19
            *layer(channels, 3),  # 19 -> 10
            *layer(channels, 3),  # 10 -> 5
        )
        self.head = nn.Linear(channels * 5, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.unsqueeze(1))  # (batch, length) -> (batch, channels, 5)
        return self.head(h.flatten(1))


class MLP(nn.Module):
    """Two hidden ReLU layers of ``width`` units (the MNIST-1D paper's MLP baseline)."""

    def __init__(self, width: int = 100, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(SEQUENCE_LENGTH, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FullyConnected(nn.Module):
    """ReLU hidden layers of the given widths and a linear classifier: the fully connected
    nets of Shallue et al. (2019) on MNIST (FC-1024, FC-128-128-128 ... FC-2048-2048-2048),
    here on the 40 inputs of MNIST-1D, without normalisation or dropout."""

    def __init__(self, widths: tuple[int, ...], classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        fan_in = SEQUENCE_LENGTH
        for width in widths:
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        self.net = nn.Sequential(*layers, nn.Linear(fan_in, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MAX_FC_LAYERS = 16


def fc_widths(model: str, key: str = "workload.model") -> tuple[int, ...]:
    """``"fc-128-128-128"`` -> (128, 128, 128); ``ConfigError`` naming ``key`` otherwise."""
    parts = model.split("-") if isinstance(model, str) else []
    ok = (
        len(parts) >= 2
        and parts[0] == "fc"
        and len(parts) - 1 <= MAX_FC_LAYERS
        and all(p.isdigit() and 1 <= int(p) <= MAX_WIDTH for p in parts[1:])
    )
    if not ok:
        raise ConfigError(
            f"{key} must name a fully connected net as fc-W1-W2-... (hidden widths from 1 to "
            f"{MAX_WIDTH}, 1 to {MAX_FC_LAYERS} layers; Shallue et al.: fc-1024, fc-128-128-128 ... "
            f"fc-2048-2048-2048), got {model!r}"
        )
    return tuple(int(p) for p in parts[1:])


# -- registered workloads ------------------------------------------------------------------

MAX_NUM_SAMPLES = 10_000_000
"""Generation is a Python loop (about 5000 samples per second): 10 M samples is hours."""


@dataclass(frozen=True)
class Mnist1dConfig:
    """``[workload]`` of ``mnist1d_cnn`` and ``mnist1d_mlp``."""

    num_samples: int = DEFAULT_NUM_SAMPLES
    """Train + test samples generated (80 % train, 20 % test; ``validation_fraction`` of
    the training samples are then held out for validation)."""
    seed: int = DEFAULT_SEED
    """The generation seed of the data set itself (training order and model init take the
    run's seed)."""
    data_path: str | None = None
    """The cache directory of generated data sets (default: ``~/.cache/localsgd``)."""
    train_error: bool = False
    """Also evaluate the error on the whole training split (metric ``train_error``; the
    training-error curves of Goyal et al. 2017, Figure 2)."""
    validation_fraction: float = VALIDATION_FRACTION
    """The share of the training samples held out for validation (never trained on; what
    searches, targets and early stops select on); 0 holds none out."""

    def __post_init__(self) -> None:
        check_int("workload.num_samples", self.num_samples, 100, MAX_NUM_SAMPLES)
        check_validation_fraction("workload.validation_fraction", self.validation_fraction)
        check_int("workload.seed", self.seed, 0, 2**32 - 1)
        if self.data_path is not None:
            check_directory("workload.data_path", self.data_path)
        check_bool("workload.train_error", self.train_error)


@dataclass(frozen=True)
class Mnist1dMlpConfig(Mnist1dConfig):
    """``[workload]`` of ``mnist1d_mlp``: the data options and the MLP's width."""

    width: int = 100
    """Units in each of the two hidden layers: about width² + 52·width parameters (100:
    the paper's 15,210; 2240: 5.1 M, a communication-heavy model for network studies)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("workload.width", self.width, 1, MAX_WIDTH)


MAX_WIDTH = 16384
"""About 270 M parameters: beyond it the MLP no longer fits a worker's memory comfortably."""


@dataclass(frozen=True)
class Mnist1dFcConfig(Mnist1dConfig):
    """``[workload]`` of ``mnist1d_fc``: the data options and the net's hidden widths."""

    model: str = "fc-128-128-128"
    """``fc-W1-W2-...``: one ReLU layer per width (Shallue et al. 2019: ``fc-1024``,
    ``fc-128-128-128``, ``fc-256-256-256``, ``fc-512-512-512``, ``fc-1024-1024-1024``,
    ``fc-2048-2048-2048``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        fc_widths(self.model)


def _mnist1d(
    name: str, model_factory: Callable[[], nn.Module], recipe: dict[str, Any], config: Mnist1dConfig
) -> TensorWorkload:
    arrays = load_arrays(config.num_samples, config.seed, config.data_path)
    return TensorWorkload(
        name=name,
        num_classes=NUM_CLASSES,
        x_train=torch.as_tensor(arrays["x"], dtype=torch.float32),
        y_train=torch.as_tensor(arrays["y"], dtype=torch.long),
        x_test=torch.as_tensor(arrays["x_test"], dtype=torch.float32),
        y_test=torch.as_tensor(arrays["y_test"], dtype=torch.long),
        model_factory=model_factory,
        recipe=recipe,
        config=dataclasses.asdict(config),
        train_error=config.train_error,
        validation_fraction=config.validation_fraction,
    )


@register("mnist1d_cnn")
def mnist1d_cnn(config: Mnist1dConfig) -> TensorWorkload:
    """MNIST-1D with :class:`ConvNet1D`; options in :class:`Mnist1dConfig`."""
    return _mnist1d("mnist1d_cnn", ConvNet1D, CNN_RECIPE, config)


@register("mnist1d_mlp")
def mnist1d_mlp(config: Mnist1dMlpConfig) -> TensorWorkload:
    """MNIST-1D with :class:`MLP`; options in :class:`Mnist1dMlpConfig`."""
    return _mnist1d("mnist1d_mlp", functools.partial(MLP, config.width), MLP_RECIPE, config)


@register("mnist1d_fc")
def mnist1d_fc(config: Mnist1dFcConfig) -> TensorWorkload:
    """MNIST-1D with :class:`FullyConnected` (Shallue et al.'s MNIST nets), trained with
    plain SGD in their study (``optimizer.momentum = 0``, no Nesterov, no weight decay);
    options in :class:`Mnist1dFcConfig`."""
    widths = fc_widths(config.model)
    return _mnist1d("mnist1d_fc", functools.partial(FullyConnected, widths), FC_RECIPE, config)
