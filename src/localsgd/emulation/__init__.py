"""Emulated multi-node clusters on one machine: network namespaces joined by a bridge, links
shaped with ``tc ... tbf``, one ``torchrun`` per node; link calibration for the cost model.

Needs root and iproute2; :func:`unavailable` says why not. See ``docs/emulation.md``.
"""

from localsgd.emulation.calibrate import Calibration, LinkFit, calibrate, fit_link, probe_sizes
from localsgd.emulation.cluster import EmulatedCluster, Placement
from localsgd.emulation.network import (
    EmulatedNetwork,
    EmulationError,
    NetworkSpec,
    cleanup_stale,
    parse_rate,
    unavailable,
)

__all__ = [
    "Calibration",
    "EmulatedCluster",
    "EmulatedNetwork",
    "EmulationError",
    "LinkFit",
    "NetworkSpec",
    "Placement",
    "calibrate",
    "cleanup_stale",
    "fit_link",
    "parse_rate",
    "probe_sizes",
    "unavailable",
]
