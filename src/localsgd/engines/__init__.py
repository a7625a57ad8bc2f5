"""Engines: how the K workers of a run execute, registered by name.

``processes`` (K worker processes on torch.distributed) and ``simulated`` (K replicas
stacked in one process, the same semantics). A run config names its engine; everything a
report needs to know about one is its :class:`~localsgd.records.EngineInfo`.
"""

from localsgd.engines import processes, simulated
from localsgd.engines.base import (
    Cancelled,
    Engine,
    Job,
    Replicas,
    Session,
    TrialBatching,
    WorkerFailure,
    check_world,
    get,
    names,
    register,
)

__all__ = [
    "Cancelled",
    "Engine",
    "Job",
    "Replicas",
    "Session",
    "TrialBatching",
    "WorkerFailure",
    "check_world",
    "get",
    "names",
    "processes",
    "register",
    "simulated",
]
