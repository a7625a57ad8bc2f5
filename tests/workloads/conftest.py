"""Shared fixtures: a small generated MNIST-1D in a private cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from localsgd import workloads
from localsgd.workloads import mnist1d

NUM_SAMPLES = 1000  # -> 800 train (80 of them held out for validation) / 200 test
N_TRAIN, N_VALIDATION, N_TEST = 720, 80, 200


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One XDG cache for the module: MNIST-1D is generated once, then read back."""
    home = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def cnn(cache_home: Path) -> workloads.Workload:
    return workloads.build("mnist1d_cnn", num_samples=NUM_SAMPLES)


@pytest.fixture(scope="module")
def arrays(cnn: workloads.Workload) -> dict[str, np.ndarray]:
    return mnist1d.load_arrays(NUM_SAMPLES, mnist1d.DEFAULT_SEED)


@pytest.fixture
def one_thread() -> Iterator[None]:
    # A tiny model on a busy 2-core machine trains many times faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
