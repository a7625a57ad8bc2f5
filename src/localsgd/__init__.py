"""localsgd: communication-efficient data-parallel training — local SGD and its family.

``import localsgd`` is cheap: torch and the rest load on first use of an attribute.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DataParallel": ("localsgd.data_parallel", "DataParallel"),
    "init_distributed": ("localsgd.distributed", "init_distributed"),
    "destroy_distributed": ("localsgd.distributed", "destroy_distributed"),
    "DistInfo": ("localsgd.distributed", "DistInfo"),
    "exit_process": ("localsgd.util.lifetime", "exit_process"),
    "algorithms": ("localsgd.algorithms", None),
    "comm": ("localsgd.comm", None),
    "workloads": ("localsgd.workloads", None),
}

if TYPE_CHECKING:
    from localsgd import algorithms, comm, workloads
    from localsgd.data_parallel import DataParallel
    from localsgd.distributed import DistInfo, destroy_distributed, init_distributed
    from localsgd.util.lifetime import exit_process

__all__ = [
    "DataParallel",
    "DistInfo",
    "algorithms",
    "comm",
    "destroy_distributed",
    "exit_process",
    "init_distributed",
    "workloads",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'localsgd' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
