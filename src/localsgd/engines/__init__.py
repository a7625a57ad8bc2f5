"""Engines: how the K workers of a run execute, registered by name.

Each engine is a sub-package that registers itself (:func:`register`; :func:`names` lists
them, ``localsgd engines`` too, with what each can do). A run config names its engine;
what the run config and studies need to know about one is the :class:`Capability` set it
declares, and what a report needs is its :class:`~localsgd.records.EngineInfo`.
"""

from localsgd.engines import hogwild, processes, simulated
from localsgd.engines.base import (
    MEANING,
    Cancelled,
    Capability,
    Engine,
    EngineOptions,
    Job,
    Replicas,
    Session,
    TrialBatching,
    WorkerFailure,
    check_world,
    get,
    having,
    names,
    register,
    requests,
    require,
    unregister,
)

__all__ = [
    "MEANING",
    "Cancelled",
    "Capability",
    "Engine",
    "EngineOptions",
    "Job",
    "Replicas",
    "Session",
    "TrialBatching",
    "WorkerFailure",
    "check_world",
    "get",
    "having",
    "hogwild",
    "names",
    "processes",
    "register",
    "requests",
    "require",
    "simulated",
    "unregister",
]
