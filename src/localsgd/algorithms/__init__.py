"""Synchronization algorithms, one module each, built by name from plain dicts.

>>> from localsgd import algorithms
>>> algorithms.build({"name": "local_sgd", "period": 8})
LocalSGD(period=8, average_buffers=True, optimizer_state='local')
"""

from localsgd.algorithms.async_local_sgd import AsyncLocalSGD
from localsgd.algorithms.base import (
    AlgorithmCapabilities,
    AlgorithmConfig,
    SyncContext,
    Synchronizer,
    build,
    get,
    names,
    register,
    unregister,
)
from localsgd.algorithms.gradient_accumulation import GradientAccumulation
from localsgd.algorithms.hierarchical import HierarchicalLocalSGD
from localsgd.algorithms.local_sgd import LocalSGD
from localsgd.algorithms.minibatch import MiniBatchSGD
from localsgd.algorithms.outer import DiLoCo, SlowMo
from localsgd.algorithms.post_local_sgd import PostLocalSGD
from localsgd.algorithms.sma import SMA

__all__ = [
    "SMA",
    "AlgorithmCapabilities",
    "AlgorithmConfig",
    "AsyncLocalSGD",
    "DiLoCo",
    "GradientAccumulation",
    "HierarchicalLocalSGD",
    "LocalSGD",
    "MiniBatchSGD",
    "PostLocalSGD",
    "SlowMo",
    "SyncContext",
    "Synchronizer",
    "build",
    "get",
    "names",
    "register",
    "unregister",
]
