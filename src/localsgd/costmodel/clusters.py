"""Named clusters (presets) and clusters described in TOML files.

Presets take standard line rates for β and *typical* latencies for α (not measurements
on any particular machine); ``docs/costmodel.md`` gives the source of every number. A TOML
file describes your own cluster::

    name = "lab"
    devices_per_node = 4          # M; 1 for one worker per machine
    seconds_per_sample = 2.0e-5   # optional: compute per sample on one device
    allreduce = "hierarchical"    # optional: or "ring" (one flat ring across nodes, as gloo)

    [intra]                       # required when devices_per_node > 1
    alpha = 2.0e-6                # seconds per message
    bandwidth_gbit = 400          # gigabits per second (10^9 bit/s), one direction

    [inter]
    alpha = 5.0e-6
    bandwidth_gbit = 100

    [codecs.int8]                 # optional, per compression.codec: its work on one device
    encode = 3.6e-9               # seconds per value encoded
    decode = 1.5e-9               # seconds per value decoded and averaged

In TOML, bandwidth is in Gb/s (``bandwidth_gbit``), as network gear is rated; in code,
:class:`~localsgd.costmodel.model.Link` takes bytes per second (1 Gb/s = 1.25e8 B/s).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsgd.costmodel.model import ALLREDUCE_ALGORITHMS, GBIT, Cluster, CodecCost, Link, check_real
from localsgd.util.checks import ConfigError, check_choice, check_int, from_dict
from localsgd.util.codec_names import CODECS

TCP_ALPHA = 50e-6
"""Typical per-message latency of kernel TCP over (10/25 GbE) Ethernet, software included."""
IB_ALPHA = 5e-6
"""Typical per-message latency of a collective step over InfiniBand EDR (RDMA ≈ 1 µs plus
the collective library's software)."""
NVLINK_ALPHA = 2e-6
"""Typical per-step latency of an NVLink ring inside a node."""
A100_NVLINK_BUS_BANDWIDTH = 235e9
"""Bytes/s: the all-reduce bus bandwidth NCCL's tuning model caps A100 NVLink 3 at
(the link rate is 300 GB/s per direction per GPU: 12 links × 25 GB/s)."""

_PRESETS: dict[str, Cluster] = {
    "10gbe": Cluster(
        name="10gbe",
        devices_per_node=1,
        inter=Link(alpha=TCP_ALPHA, bandwidth=10 * GBIT),
        description="10 Gb/s Ethernet (IEEE 802.3ae line rate), TCP, one worker per machine",
    ),
    "25gbe": Cluster(
        name="25gbe",
        devices_per_node=1,
        inter=Link(alpha=TCP_ALPHA, bandwidth=25 * GBIT),
        description="25 Gb/s Ethernet (IEEE 802.3by line rate), TCP, one worker per machine",
    ),
    "100g-ib": Cluster(
        name="100g-ib",
        devices_per_node=1,
        inter=Link(alpha=IB_ALPHA, bandwidth=100 * GBIT),
        description="100 Gb/s InfiniBand EDR (4x, data rate), RDMA, one worker per machine",
    ),
    "nvlink-node": Cluster(
        name="nvlink-node",
        devices_per_node=8,
        intra=Link(alpha=NVLINK_ALPHA, bandwidth=A100_NVLINK_BUS_BANDWIDTH),
        inter=Link(alpha=IB_ALPHA, bandwidth=100 * GBIT),
        description=(
            "nodes of 8 A100 GPUs on NVLink 3 (235 GB/s all-reduce bus bandwidth), "
            "100 Gb/s InfiniBand EDR per GPU between nodes"
        ),
    ),
    "wan": Cluster(
        name="wan",
        devices_per_node=1,
        inter=Link(alpha=50e-3, bandwidth=1 * GBIT),
        description="wide-area network: 1 Gb/s, 50 ms one-way latency, one worker per site",
    ),
}


def presets() -> list[str]:
    """The names :func:`preset` knows."""
    return list(_PRESETS)


def preset(name: str) -> Cluster:
    """The named cluster; ``ValueError`` listing the presets for an unknown name."""
    try:
        return _PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown cluster preset {name!r}; allowed: {', '.join(_PRESETS)}") from None


@dataclass(frozen=True)
class LinkFile:
    """``[intra]`` / ``[inter]`` of a cluster file."""

    alpha: float
    """Seconds of latency per message, >= 0."""
    bandwidth_gbit: float
    """Gigabits per second in one direction, > 0."""

    def link(self, table: str) -> Link:
        alpha = check_real(f"{table}.alpha", self.alpha, unit="seconds")
        gbit = check_real(f"{table}.bandwidth_gbit", self.bandwidth_gbit, strict=True, unit="Gb/s")
        return Link(alpha=alpha, bandwidth=gbit * GBIT)


@dataclass(frozen=True)
class ClusterFile:
    """A cluster file (the module docstring's layout)."""

    name: str
    """What reports call the cluster."""
    devices_per_node: int
    """M: workers per node; 1 for one worker per machine."""
    inter: LinkFile
    """The link between nodes."""
    intra: LinkFile | None = None
    """The link inside a node; required when M > 1."""
    seconds_per_sample: float | None = None
    """Compute per sample on one device (default: measured in each run)."""
    description: str = ""
    """A sentence for reports."""
    allreduce: str = "hierarchical"
    """``hierarchical`` or ``ring``: how an all-reduce spanning nodes runs (see
    :attr:`~localsgd.costmodel.model.Cluster.allreduce`)."""
    codecs: dict[str, Any] | None = None
    """``[codecs.<codec>]`` tables of ``encode`` and ``decode`` seconds per value (see
    :class:`~localsgd.costmodel.model.CodecCost`; default: measured in each run)."""


@dataclass(frozen=True)
class CodecFile:
    """One ``[codecs.<codec>]`` table of a cluster file."""

    encode: float
    """Seconds per value encoded, >= 0."""
    decode: float
    """Seconds per value decoded and averaged, >= 0."""


def _codecs(tables: Mapping[str, Any]) -> dict[str, CodecCost]:
    allowed = list(CODECS[1:])
    out = {}
    for name, table in tables.items():
        if name not in allowed:
            raise ConfigError(f"unknown key 'codecs.{name}': not a codec; allowed: {allowed}")
        spec = from_dict(CodecFile, table, f"codecs.{name}")
        out[name] = CodecCost(
            encode=check_real(f"codecs.{name}.encode", spec.encode, unit="seconds per value"),
            decode=check_real(f"codecs.{name}.decode", spec.decode, unit="seconds per value"),
        )
    return out


def cluster_from_dict(data: Mapping[str, Any]) -> Cluster:
    """A :class:`Cluster` from the TOML layout (module docstring); ``ValueError`` naming
    the key for unknown keys, missing keys and values out of range."""
    spec = from_dict(ClusterFile, data)
    check_int("devices_per_node", spec.devices_per_node, 1)
    check_choice("allreduce", spec.allreduce, ALLREDUCE_ALGORITHMS)
    if spec.devices_per_node > 1 and spec.intra is None:
        raise ConfigError(
            f"missing key 'intra': a [intra] link is required when devices_per_node = {spec.devices_per_node} > 1"
        )
    return Cluster(
        name=spec.name,
        devices_per_node=spec.devices_per_node,
        inter=spec.inter.link("inter"),
        intra=spec.intra.link("intra") if spec.intra is not None else None,
        seconds_per_sample=spec.seconds_per_sample,
        description=spec.description,
        allreduce=spec.allreduce,
        codecs=_codecs(spec.codecs or {}),
    )


def cluster_to_dict(cluster: Cluster) -> dict[str, Any]:
    """The TOML layout of ``cluster`` (bandwidth in Gb/s); ``cluster_from_dict`` inverts it."""

    def link(value: Link) -> dict[str, float]:
        return {"alpha": value.alpha, "bandwidth_gbit": value.bandwidth / GBIT}

    out: dict[str, Any] = {"name": cluster.name, "devices_per_node": cluster.devices_per_node}
    if cluster.seconds_per_sample is not None:
        out["seconds_per_sample"] = cluster.seconds_per_sample
    if cluster.description:
        out["description"] = cluster.description
    if cluster.allreduce != "hierarchical":
        out["allreduce"] = cluster.allreduce
    if cluster.intra is not None:
        out["intra"] = link(cluster.intra)
    out["inter"] = link(cluster.inter)
    if cluster.codecs:
        out["codecs"] = {name: {"encode": c.encode, "decode": c.decode} for name, c in cluster.codecs.items()}
    return out


def cluster_to_toml(cluster: Cluster, comment: str = "") -> str:
    """The cluster file text of ``cluster`` (:func:`load_cluster` reads it back); ``comment``
    lines go on top, each prefixed with ``#``."""

    def value(v: Any) -> str:
        # repr keeps every float's digits and is valid TOML; JSON's string escapes are TOML's.
        return json.dumps(v, ensure_ascii=False) if isinstance(v, str) else repr(v)

    data = cluster_to_dict(cluster)
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table in ("intra", "inter"):
        if table in data:
            lines += ["", f"[{table}]", *(f"{k} = {value(v)}" for k, v in data[table].items())]
    for name, cost in data.get("codecs", {}).items():
        lines += ["", f"[codecs.{name}]", *(f"{k} = {value(v)}" for k, v in cost.items())]
    return "\n".join(lines) + "\n"


def load_cluster(path_or_name: str | Path) -> Cluster:
    """A preset by name, else a cluster TOML file by path (a ``Path``, a name ending in
    ``.toml``, or an existing file). ``ValueError`` for an unknown name (listing the
    presets), a missing file, bad TOML, or a field out of range."""
    text = str(path_or_name)
    if not isinstance(path_or_name, Path) and text in _PRESETS:
        return _PRESETS[text]
    if not (isinstance(path_or_name, Path) or text.endswith(".toml") or Path(text).is_file()):
        raise ValueError(
            f"unknown cluster {text!r}: not a preset (one of {', '.join(_PRESETS)}) nor a cluster TOML file"
        )
    path = Path(text)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"cluster file {text!r} does not exist (presets: {', '.join(_PRESETS)})") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cluster file {text!r}: {exc}") from None
    try:
        return cluster_from_dict(data)
    except ValueError as exc:
        raise ValueError(f"cluster file {text!r}: {exc}") from None
