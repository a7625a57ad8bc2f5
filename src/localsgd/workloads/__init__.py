"""Workloads: data + model + loss + evaluation, built by name.

>>> from localsgd import workloads
>>> wl = workloads.build("mnist1d_cnn", num_samples=20000)   # generated once, then cached
>>> model = wl.make_model(seed=0)
>>> for x, y in wl.train_batches(rank, world_size, batch_size=64, epoch=0, seed=0, device="cpu"):
...     wl.loss(model(x), y).backward()
>>> wl.evaluate(model, "cpu")   # {"test_loss": ..., "test_accuracy": ...}

Registered: ``mnist1d_cnn`` (the default), ``mnist1d_mlp``, ``cifar10_resnet20``. Studies
and examples use workloads; algorithms never do.
"""

from localsgd.workloads import cifar10, mnist1d
from localsgd.workloads.base import (
    Workload,
    augment_generator,
    build,
    cache_dir,
    names,
    options,
    register,
    shard_indices,
    shuffle_generator,
)

DEFAULT = "mnist1d_cnn"

__all__ = [
    "DEFAULT",
    "Workload",
    "augment_generator",
    "build",
    "cache_dir",
    "cifar10",
    "mnist1d",
    "names",
    "options",
    "register",
    "shard_indices",
    "shuffle_generator",
]
