"""Network cost model: a run's communication counters in, wall-clock estimates on a
named cluster out.

Links follow the alpha-beta model; an all-reduce is a ring (hierarchical across nodes of
several devices); a parameter server's pushes and pulls share the server's links; a run's estimate is steps × compute per step plus the communication of
its cumulative per-scope counters. Pure Python: nothing heavy is imported.

>>> from localsgd.costmodel import preset, ring_allreduce_seconds
>>> round(ring_allreduce_seconds(100e6, 16, preset("10gbe").inter), 4)
0.1515

See ``docs/costmodel.md`` for the formulas, the presets and their sources.
"""

from __future__ import annotations

from localsgd.costmodel.clusters import (
    cluster_from_dict,
    cluster_to_dict,
    cluster_to_toml,
    load_cluster,
    preset,
    presets,
)
from localsgd.costmodel.model import (
    ALLREDUCE_ALGORITHMS,
    GBIT,
    SERVER_SCOPES,
    Cluster,
    CodecCost,
    CollectiveCost,
    Estimate,
    Link,
    allgather_cost,
    allreduce_cost,
    allreduce_seconds,
    check_delay,
    collective_seconds,
    comm_seconds,
    compute_per_step,
    estimate_run,
    gather_scope_cost,
    ring_allreduce_seconds,
    ring_cost,
    scope_cost,
    scope_size,
    server_cost,
)

__all__ = [
    "ALLREDUCE_ALGORITHMS",
    "GBIT",
    "SERVER_SCOPES",
    "Cluster",
    "CodecCost",
    "CollectiveCost",
    "Estimate",
    "Link",
    "allgather_cost",
    "allreduce_cost",
    "allreduce_seconds",
    "check_delay",
    "cluster_from_dict",
    "cluster_to_dict",
    "cluster_to_toml",
    "collective_seconds",
    "comm_seconds",
    "compute_per_step",
    "estimate_run",
    "gather_scope_cost",
    "load_cluster",
    "preset",
    "presets",
    "ring_allreduce_seconds",
    "ring_cost",
    "scope_cost",
    "scope_size",
    "server_cost",
]
