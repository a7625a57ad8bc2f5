"""Alpha-beta links, clusters of nodes, all-reduce times, and run estimates.

A link costs ``α + n/β`` to move one message of n bytes (Hockney's model). A ring
all-reduce of n bytes over p ranks takes 2(p−1) steps, each moving n/p bytes per rank,
so T = 2(p−1)·α + 2·(p−1)/p · n/β (Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan
2009). Every time here is affine in n, so a run's total is exact from its cumulative
counters: Σ over scopes of collectives × latency term + bytes × bandwidth term.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from localsgd.util.checks import check_float, check_int

GBIT = 1e9 / 8
"""Bytes per second in one gigabit per second (10⁹ bit/s, decimal as line rates are)."""


def check_real(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False, unit: str = "") -> float:
    """``value`` as a float if it is a finite real number ≥ (or >, ``strict``) ``minimum``;
    ``ValueError`` naming ``name`` otherwise."""
    return check_float(name, value, minimum, low_open=strict, unit=unit)


@dataclass(frozen=True)
class Link:
    """A point-to-point link in the alpha-beta model: one message of n bytes takes
    ``alpha + n / bandwidth`` seconds. In a ring every rank sends and receives at once, so
    ``bandwidth`` is what one rank can push in one direction while its neighbour does the
    same (a full-duplex line rate, or NCCL's "bus bandwidth")."""

    alpha: float
    """α: seconds of latency per message (start-up, software stack, switch hops), ≥ 0."""
    bandwidth: float
    """β: bytes per second in one direction, > 0 (1 Gb/s = ``GBIT`` = 1.25e8 B/s)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_real("alpha", self.alpha, unit="seconds"))
        object.__setattr__(
            self, "bandwidth", check_real("bandwidth", self.bandwidth, strict=True, unit="bytes/s")
        )


@dataclass(frozen=True)
class CodecCost:
    """A codec's own work on one device, in seconds per value: what a compressed average
    costs beside moving its payload. One worker encodes its n values once and decodes n
    values per member's payload (and its own once more with error feedback), adding each
    into the mean: ``encode · encoded + decode · decoded`` (the counters ``encoded`` and
    ``decoded`` of :class:`localsgd.comm.base.CommStats`)."""

    encode: float
    """Seconds per value encoded (quantizing, packing, the error-feedback residual's update)."""
    decode: float
    """Seconds per value decoded and added into the mean."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "encode", check_real("encode", self.encode, unit="seconds per value"))
        object.__setattr__(self, "decode", check_real("decode", self.decode, unit="seconds per value"))

    def seconds(self, encoded: float, decoded: float) -> float:
        return self.encode * encoded + self.decode * decoded


ALLREDUCE_ALGORITHMS = ("hierarchical", "ring")
"""The values of :attr:`Cluster.allreduce`."""


@dataclass(frozen=True)
class Cluster:
    """Nodes of ``devices_per_node`` devices (M): devices of one node talk over ``intra``,
    nodes over ``inter``. A flat cluster (one worker per machine) has M = 1 and no intra link.

    K workers fill nodes in rank order: ranks [0, M) on the first node, [M, 2M) on the
    next, ..., so they occupy ceil(K/M) nodes (one node of K devices when K < M).
    """

    name: str
    """Short name, shown in reports."""
    devices_per_node: int
    """M: devices (workers) per node, ≥ 1."""
    inter: Link
    """The link between nodes (per device: see ``docs/costmodel.md`` on rail-optimised NICs)."""
    intra: Link | None = None
    """The link between the devices of one node; required when M > 1, unused when M = 1."""
    seconds_per_sample: float | None = None
    """Compute seconds per training sample on one target device (forward + backward +
    optimizer step); a step of per-worker batch B costs B × this. None: use the compute
    time measured in the run."""
    description: str = ""
    """One line on what the cluster is and where its numbers come from."""
    allreduce: str = "hierarchical"
    """How an all-reduce spanning several nodes of M > 1 devices runs: ``hierarchical``
    (intra-node reduce-scatter, M concurrent inter-node rings on the n/M shards, intra-node
    all-gather: NCCL on rail-optimised nodes) or ``ring`` (one flat ring over all p ranks in
    rank order, as gloo runs every all-reduce: the hop that crosses nodes sets the pace of
    every step). Irrelevant when M = 1."""
    codecs: Mapping[str, CodecCost] = field(default_factory=dict, hash=False)
    """Per ``compression.codec`` (``int8``, ...), its work on one target device (see
    :class:`CodecCost`; ``localsgd cluster calibrate`` measures them). A codec missing
    here is charged what the run measured (its ``codec_seconds``), as compute is without
    ``seconds_per_sample``."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        g = self.devices_per_node
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"devices_per_node must be an integer >= 1, got {g!r}")
        if not isinstance(self.inter, Link):
            raise ValueError(f"inter must be a Link(alpha, bandwidth), got {self.inter!r}")
        if self.intra is not None and not isinstance(self.intra, Link):
            raise ValueError(f"intra must be a Link(alpha, bandwidth) or None, got {self.intra!r}")
        if g > 1 and self.intra is None:
            raise ValueError(f"intra is required when devices_per_node > 1 (got devices_per_node = {g})")
        if self.seconds_per_sample is not None:
            value = check_real("seconds_per_sample", self.seconds_per_sample, strict=True, unit="seconds")
            object.__setattr__(self, "seconds_per_sample", value)
        if not isinstance(self.description, str):
            raise ValueError(f"description must be a string, got {self.description!r}")
        if self.allreduce not in ALLREDUCE_ALGORITHMS:
            raise ValueError(f"allreduce must be one of {list(ALLREDUCE_ALGORITHMS)}, got {self.allreduce!r}")
        if not isinstance(self.codecs, Mapping) or not all(
            isinstance(k, str) and isinstance(v, CodecCost) for k, v in self.codecs.items()
        ):
            raise ValueError(f"codecs must map codec names to CodecCost(encode, decode), got {self.codecs!r}")
        object.__setattr__(self, "codecs", dict(self.codecs))

    def codec_seconds(self, codec: str | None, counters: Mapping[str, Any]) -> float:
        """The codec work of a scope's counters (its ``encoded``/``decoded`` values): priced
        by :attr:`codecs` when it has ``codec``, else the run's measured ``codec_seconds``."""
        cost = self.codecs.get(codec) if codec else None
        if cost is None:
            return check_real("codec_seconds", counters.get("codec_seconds", 0.0), unit="seconds")
        encoded = check_real("encoded", counters.get("encoded", 0))
        decoded = check_real("decoded", counters.get("decoded", 0))
        return cost.seconds(encoded, decoded)

    def placement(self, workers: int) -> tuple[int, int]:
        """(nodes, devices used per node) for K = ``workers``: (ceil(K/M), min(K, M))."""
        _check_workers(workers)
        return math.ceil(workers / self.devices_per_node), min(workers, self.devices_per_node)

    def _flat(self, p: int) -> bool:
        """Whether an all-reduce over ranks [0, p), p > M, is one flat ring at the
        inter-node link's pace (rather than hierarchical)."""
        g = self.devices_per_node
        return g == 1 or p % g != 0 or self.allreduce == "ring"

    def _intra(self) -> Link:
        assert self.intra is not None, f"cluster {self.name!r}: M = {self.devices_per_node} needs intra"
        return self.intra


def _check_workers(workers: Any, name: str = "workers") -> int:
    check_int(name, workers, 1)
    return int(workers)


@dataclass(frozen=True)
class CollectiveCost:
    """The time of one collective as an affine function of its payload n:
    ``latency + per_byte * n``. Costs of consecutive stages add."""

    latency: float
    """Seconds independent of the payload (the α terms)."""
    per_byte: float
    """Seconds per payload byte (the β terms)."""

    def seconds(self, nbytes: float) -> float:
        return self.latency + self.per_byte * nbytes

    def __add__(self, other: CollectiveCost) -> CollectiveCost:
        return CollectiveCost(self.latency + other.latency, self.per_byte + other.per_byte)


ZERO = CollectiveCost(0.0, 0.0)


# -- one collective --------------------------------------------------------------------


def ring_allreduce_seconds(nbytes: float, p: int, link: Link) -> float:
    """T = 2(p−1)·α + 2·(p−1)/p · n/β: a reduce-scatter then an all-gather, each p−1 steps
    of n/p bytes per rank. 0 for p = 1."""
    _check_workers(p, "p")
    check_real("nbytes", nbytes, unit="bytes")
    if p == 1:
        return 0.0
    return 2 * (p - 1) * link.alpha + 2 * (p - 1) / p * nbytes / link.bandwidth


def ring_cost(p: int, link: Link) -> CollectiveCost:
    """:func:`ring_allreduce_seconds` as (latency, per-byte) terms."""
    _check_workers(p, "p")
    if p == 1:
        return ZERO
    return CollectiveCost(2 * (p - 1) * link.alpha, 2 * (p - 1) / (p * link.bandwidth))


def allreduce_seconds(nbytes: float, p: int, cluster: Cluster) -> float:
    """One all-reduce of ``nbytes`` over ranks [0, p) of ``cluster`` (placed in rank order).

    - p = 1: 0.
    - p ≤ M (one node): a ring on the intra-node link.
    - M = 1 (one device per node): a ring on the inter-node link.
    - p a multiple of M, N = p/M > 1 nodes, ``cluster.allreduce == "hierarchical"``: an
      intra-node reduce-scatter, (M−1)(α_i + n/(M·β_i)); M concurrent inter-node ring
      all-reduces of the n/M-byte shards over N nodes, one per local rank; an intra-node
      all-gather, (M−1)(α_i + n/(M·β_i)).
    - otherwise (a partly filled last node, or ``allreduce == "ring"``): one flat ring over
      all p ranks at the pace of the inter-node link, since a ring advances in lock-step
      and its slowest hop sets each step.
    """
    _check_workers(p, "p")
    check_real("nbytes", nbytes, unit="bytes")
    g = cluster.devices_per_node
    if p == 1:
        return 0.0
    if p <= g:
        return ring_allreduce_seconds(nbytes, p, cluster._intra())
    if cluster._flat(p):
        return ring_allreduce_seconds(nbytes, p, cluster.inter)
    intra = cluster._intra()
    reduce_scatter = (g - 1) * (intra.alpha + nbytes / (g * intra.bandwidth))
    across = ring_allreduce_seconds(nbytes / g, p // g, cluster.inter)
    all_gather = (g - 1) * (intra.alpha + nbytes / (g * intra.bandwidth))
    return reduce_scatter + across + all_gather


def allreduce_cost(p: int, cluster: Cluster) -> CollectiveCost:
    """:func:`allreduce_seconds` as (latency, per-byte) terms."""
    _check_workers(p, "p")
    g = cluster.devices_per_node
    if p == 1:
        return ZERO
    if p <= g:
        return ring_cost(p, cluster._intra())
    if cluster._flat(p):
        return ring_cost(p, cluster.inter)
    across = ring_cost(p // g, cluster.inter)
    # The inter-node rings carry shards of n/M bytes: their per-byte term scales by 1/M.
    return ring_cost(g, cluster._intra()) + CollectiveCost(across.latency, across.per_byte / g)


# -- scopes ----------------------------------------------------------------------------

_BLOCK = re.compile(r"block(\d+)")


SERVER_SCOPES = ("push", "pull")
"""A parameter server's transfers (:data:`localsgd.comm.base.PUSH` and ``PULL``): one
model each way per exchange between a worker and the server on rank 0."""


def scope_size(scope: str, workers: int) -> int:
    """Ranks taking part in one collective of ``scope`` (``"world"`` or ``"block{b}"``,
    the labels of :class:`localsgd.comm.base.CommStats`) in a world of ``workers``; for a
    parameter server's ``push``/``pull``, the workers sharing the server's link."""
    _check_workers(workers)
    if scope == "world" or scope in SERVER_SCOPES:
        return workers
    match = _BLOCK.fullmatch(scope)
    if match is None:
        raise ValueError(f"unknown scope {scope!r}; allowed: 'world' or 'block<b>' (e.g. 'block2')")
    size = int(match.group(1))
    if size < 1 or workers % size:
        raise ValueError(f"scope {scope!r}: block size {size} does not divide the {workers} workers")
    return size


def _block_on_one_node(size: int, workers: int, cluster: Cluster) -> bool:
    g = cluster.devices_per_node
    return size <= g and (workers <= g or g % size == 0)


def server_cost(workers: int, cluster: Cluster) -> CollectiveCost:
    """One push or pull of a worker to or from a parameter server on rank 0's node, when
    every worker moves as much (the affine terms per byte of *one* worker's transfers).

    The server's links carry every worker's transfers one after another: the M − 1 other
    workers of its node over the intra-node link, the K − M workers of other nodes over
    its inter-node link (its own worker's transfers stay in its memory). Per byte of one
    worker's transfer the server's busiest link is therefore busy
    max((K − M')/β_e, (M' − 1)/β_i) seconds, M' = min(K, M): the time a worker waits when the
    server is the bottleneck, which this model charges to every transfer (a push and a pull
    per round: 2 transfers of the model). Latency: α of the link the farthest worker uses.
    One worker: 0 (the server is in its process)."""
    _check_workers(workers)
    if workers == 1:
        return ZERO
    local = min(workers, cluster.devices_per_node)
    remote = workers - local
    per_byte = remote / cluster.inter.bandwidth if remote else 0.0
    if local > 1:
        per_byte = max(per_byte, (local - 1) / cluster._intra().bandwidth)
    latency = cluster.inter.alpha if remote else cluster._intra().alpha
    return CollectiveCost(latency, per_byte)


def scope_cost(scope: str, workers: int, cluster: Cluster) -> CollectiveCost:
    """The (latency, per-byte) terms of one collective of ``scope`` in a run of ``workers``.

    World: :func:`allreduce_cost` over all K workers. A block of b consecutive ranks
    (all blocks run at once, each on its own links): a ring on the intra-node link when
    every block lies inside one node (b ≤ M and b divides M, or all K workers share one
    node); when b < M does not divide M some blocks straddle two nodes, and their ring runs
    at the inter-node link's pace; b > M is costed like a world all-reduce over b ranks.
    """
    size = scope_size(scope, workers)
    if scope in SERVER_SCOPES:
        return server_cost(workers, cluster)
    if scope == "world" or size == 1:
        return allreduce_cost(size, cluster)
    if _block_on_one_node(size, workers, cluster):
        return ring_cost(size, cluster._intra())
    if size < cluster.devices_per_node:
        return ring_cost(size, cluster.inter)
    return allreduce_cost(size, cluster)


# -- compressed averages: an all-gather of each rank's payload -------------------------------


def ring_allgather_cost(p: int, link: Link) -> CollectiveCost:
    """A ring all-gather of an n-byte payload per rank: p−1 steps, each passing one rank's
    n bytes on, T = (p−1)·α + (p−1)·n/β. n is what each rank sends (a codec's payload), so
    per byte it costs p/2 times a ring all-reduce's 2(p−1)/p: compression pays only where
    it shrinks the payload by more than that."""
    _check_workers(p, "p")
    if p == 1:
        return ZERO
    return CollectiveCost((p - 1) * link.alpha, (p - 1) / link.bandwidth)


def allgather_cost(p: int, cluster: Cluster) -> CollectiveCost:
    """An all-gather of n bytes per rank over ranks [0, p) of ``cluster``, placed as
    :func:`allreduce_cost` places them: one ring inside a node or across single-device
    nodes; with ``allreduce = "hierarchical"`` and N = p/M full nodes, M concurrent
    inter-node rings (one per local rank, each gathering N payloads), then an intra-node
    all-gather of the N·n bytes each holds, (N−1)(α_e + n/β_e) + (M−1)(α_i + N·n/β_i);
    otherwise one flat ring at the inter-node link's pace."""
    _check_workers(p, "p")
    g = cluster.devices_per_node
    if p == 1:
        return ZERO
    if p <= g:
        return ring_allgather_cost(p, cluster._intra())
    if cluster._flat(p):
        return ring_allgather_cost(p, cluster.inter)
    nodes = p // g
    across = ring_allgather_cost(nodes, cluster.inter)
    inside = ring_allgather_cost(g, cluster._intra())
    return across + CollectiveCost(inside.latency, inside.per_byte * nodes)


def gather_scope_cost(scope: str, workers: int, cluster: Cluster) -> CollectiveCost:
    """:func:`scope_cost` for an all-gather (a compressed average) of ``scope``: blocks
    inside a node gather on the intra-node link, straddling ones at the inter-node pace."""
    size = scope_size(scope, workers)
    if scope in SERVER_SCOPES:
        raise ValueError(f"scope {scope!r} is a parameter server's transfer, not a collective")
    if scope == "world" or size == 1:
        return allgather_cost(size, cluster)
    if _block_on_one_node(size, workers, cluster):
        return ring_allgather_cost(size, cluster._intra())
    if size < cluster.devices_per_node:
        return ring_allgather_cost(size, cluster.inter)
    return allgather_cost(size, cluster)


def collective_seconds(nbytes: float, scope: str, workers: int, cluster: Cluster) -> float:
    """One collective of ``nbytes`` in ``scope``, from the per-collective formulas
    (:func:`allreduce_seconds`, :func:`ring_allreduce_seconds`); equals
    ``scope_cost(...).seconds(nbytes)``."""
    size = scope_size(scope, workers)
    if scope in SERVER_SCOPES:
        return server_cost(workers, cluster).seconds(nbytes)
    if scope == "world" or size == 1:
        return allreduce_seconds(nbytes, size, cluster)
    if _block_on_one_node(size, workers, cluster):
        return ring_allreduce_seconds(nbytes, size, cluster._intra())
    if size < cluster.devices_per_node:
        return ring_allreduce_seconds(nbytes, size, cluster.inter)
    return allreduce_seconds(nbytes, size, cluster)


# -- a run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A run's wall-clock estimate on a cluster: compute and communication, added
    (communication is what a step waits for: all of it, unless a streamed run's overlap
    hides part behind compute)."""

    compute_seconds: float
    """steps × compute seconds per step."""
    comm_seconds: float
    """Σ over scopes of collectives × latency term + payload bytes × bandwidth term, less
    what overlap hides."""
    total_seconds: float
    """compute_seconds + comm_seconds."""

    def as_dict(self) -> dict[str, float]:
        return {
            "compute_seconds": self.compute_seconds,
            "comm_seconds": self.comm_seconds,
            "total_seconds": self.total_seconds,
        }


def check_delay(
    delay: Mapping[str, Any] | None, workers: int | None, name: str = "delay"
) -> dict[str, float]:
    """``delay`` as ``{scope: seconds}``: the keys are scopes (``world``, or ``block<b>``
    with b >= 1 dividing the ``workers``; any b when ``workers`` is None), the values finite
    seconds >= 0. ``ValueError`` naming ``name.<scope>`` otherwise; None is no delay."""
    if delay is None:
        return {}
    if not isinstance(delay, Mapping):
        raise ValueError(f"{name} must be a table of scope = seconds, got {type(delay).__name__} {delay!r}")
    out: dict[str, float] = {}
    for scope, seconds in delay.items():
        key = str(scope)
        match = _BLOCK.fullmatch(key)
        try:
            if workers is not None:
                scope_size(key, workers)
            elif key != "world" and (match is None or int(match.group(1)) < 1):
                raise ValueError(f"unknown scope {key!r}; allowed: 'world' or 'block<b>' (e.g. 'block2')")
        except ValueError as exc:
            raise ValueError(f"{name}.{key}: {exc}") from None
        out[key] = check_real(f"{name}.{key}", seconds, unit="seconds")
    return out


def comm_seconds(
    counters_by_scope: Mapping[str, Mapping[str, Any]],
    workers: int,
    cluster: Cluster,
    delay: Mapping[str, float] | None = None,
    hidden: Mapping[str, float] | None = None,
    codec: str | None = None,
) -> float:
    """Σ_scope collectives_s · (latency_s + delay_s) + bytes_s · per_byte_s, from cumulative
    counters ``{"world": {"collectives": c, "bytes": b, ...}, "block2": {...}}`` (other keys,
    such as measured ``seconds``, are ignored). ``delay`` adds seconds to every collective
    of a scope (``{"world": 1.0}``: a run's injected ``comm.delay``). Exact when all
    collectives of a scope move the same payload, and in general since every term is affine
    in the payload. A scope's ``gathers`` and ``gathered_bytes`` (compressed averages,
    included in its totals) are priced as all-gathers (:func:`gather_scope_cost`), the
    rest as all-reduces; their codec's own work is added (:meth:`Cluster.codec_seconds`,
    ``codec`` naming the run's ``compression.codec``).

    ``hidden`` (``{scope: seconds}``): compute each collective of a scope runs beside
    (streaming's τ steps of compute while a fragment's average is in flight). A step then
    waits only for what the transfer does not hide: per collective max(0, latency + delay +
    payload · per_byte − hidden), with the scope's mean transfer per collective."""
    added = check_delay(delay, workers)
    hide = dict(hidden or {})
    total = 0.0
    for scope, counters in counters_by_scope.items():
        if not isinstance(counters, Mapping):
            raise ValueError(f"counters of scope {scope!r} must be a mapping, got {counters!r}")
        collectives = check_real(f"{scope}.collectives", counters.get("collectives", 0))
        nbytes = check_real(f"{scope}.bytes", counters.get("bytes", 0), unit="bytes")
        if collectives == 0 and nbytes == 0:
            continue
        gathers = check_real(f"{scope}.gathers", counters.get("gathers", 0))
        gathered = check_real(f"{scope}.gathered_bytes", counters.get("gathered_bytes", 0), unit="bytes")
        if gathers > collectives or gathered > nbytes:
            raise ValueError(
                f"scope {scope!r} counts more gathers ({gathers:g}, {gathered:g} B) than collectives "
                f"({collectives:g}, {nbytes:g} B)"
            )
        cost = scope_cost(scope, workers, cluster)
        reduces, reduced = collectives - gathers, nbytes - gathered
        seconds = collectives * added.get(scope, 0.0) + reduces * cost.latency + reduced * cost.per_byte
        if gathers:
            gather = gather_scope_cost(scope, workers, cluster)
            seconds += gathers * gather.latency + gathered * gather.per_byte
            seconds += cluster.codec_seconds(codec, counters)
        behind = hide.get(scope, 0.0)
        if behind and collectives:
            if math.isnan(behind):
                return math.nan
            seconds = collectives * max(0.0, seconds / collectives - behind)
        total += seconds
    return total


def compute_per_step(
    batch_size: int, cluster: Cluster, measured_compute_per_step: float | None = None
) -> float:
    """Seconds of computation per step on one worker: B × ``cluster.seconds_per_sample``
    when the cluster has it (it describes the target device, so it takes precedence), else
    ``measured_compute_per_step``. NaN passes through (a run without the measurement)."""
    if cluster.seconds_per_sample is not None:
        _check_workers(batch_size, "batch_size")
        return batch_size * cluster.seconds_per_sample
    if measured_compute_per_step is None:
        raise ValueError(
            f"cluster {cluster.name!r} has no seconds_per_sample, so measured_compute_per_step "
            "is required (a run's (wall_seconds - comm_seconds) / steps)"
        )
    if isinstance(measured_compute_per_step, float) and math.isnan(measured_compute_per_step):
        return math.nan
    return check_real("measured_compute_per_step", measured_compute_per_step, unit="seconds")


def estimate_run(
    counters_by_scope: Mapping[str, Mapping[str, Any]],
    steps: float,
    workers: int,
    batch_size: int,
    cluster: Cluster,
    measured_compute_per_step: float | None = None,
    delay: Mapping[str, float] | None = None,
    overlap: Mapping[str, int] | None = None,
    codec: str | None = None,
) -> Estimate:
    """Estimate a run (or its prefix up to an evaluation row) on ``cluster``:
    ``steps`` × :func:`compute_per_step` + :func:`comm_seconds` of its cumulative counters
    (with ``delay`` seconds added to every collective of a scope). ``overlap``
    (``{scope: τ}``): a streamed run's averages of that scope are in flight for τ steps, so
    each hides τ × the compute of a step (the exit sync, not overlapped, is counted so too).
    ``codec``: the run's ``compression.codec``, whose work :attr:`Cluster.codecs` prices."""
    steps = check_real("steps", steps)
    _check_workers(workers)
    per_step = compute_per_step(batch_size, cluster, measured_compute_per_step)
    compute = steps * per_step
    hidden = {scope: int(tau) * per_step for scope, tau in (overlap or {}).items() if tau}
    comm = comm_seconds(counters_by_scope, workers, cluster, delay, hidden, codec)
    return Estimate(compute, comm, compute + comm)
