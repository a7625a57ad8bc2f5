"""Link calibration: α (latency) and β (bandwidth) of an emulated cluster's links, from
real gloo all-reduces, written as a cluster file the cost model reads.

Two probes run on the cluster (:mod:`localsgd.emulation.probe`): one process on each of
two nodes (the inter-node link) and two processes on one node (its loopback, the
intra-node link). Each times all-reduces of a few payload sizes n; a ring all-reduce over
p = 2 ranks takes T(n) = 2(p−1)·α + 2(p−1)/p · n/β = 2α + n/β, so a straight line fitted
to (n, T) gives α = intercept / 2 and β = 1 / slope. The fit is least squares on the
*relative* residuals (each point weighted by 1/T): times span three decades, and plain
least squares would let the largest payloads decide the intercept alone), made robust by
reweighting (least absolute relative deviations): on a busy machine one size can hiccup.

A shaped link's token bucket lets its first ``burst`` bytes through at memory speed (the
probe pauses before each all-reduce so that the bucket is full, as it is after a run's
compute between two syncs): the line is fitted to the bytes each link carries beyond
the bucket, x = max(2(p−1)/p · n − burst, 0), i.e. T = 2(p−1)·α + x/β. The cost model has
no bucket; for payloads far above it (a model of millions of parameters) it changes
nothing, for payloads near it (a model of a few thousand) the model overestimates.

The cluster written has ``allreduce = "ring"``: gloo runs every all-reduce as one flat ring
over all ranks (see ``docs/costmodel.md``).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from localsgd.costmodel import Cluster, CodecCost, Link
from localsgd.emulation.cluster import EmulatedCluster

MIN_BYTES = 4096
MAX_BYTES = 32 * 2**20
PROBE_SECONDS = 0.3
"""The largest probe payload takes about this long on a shaped link (at most MAX_BYTES)."""
IRLS_ROUNDS = 30
IRLS_FLOOR = 1e-3
"""Relative residuals below 0.1 % count as 0.1 % when reweighting (no division by zero)."""


@dataclass(frozen=True)
class LinkFit:
    """A link's α and β fitted to timed ring all-reduces over ``world_size`` ranks."""

    alpha: float
    """Seconds per message (≥ 0; a negative intercept is clipped to 0)."""
    bandwidth: float
    """Bytes per second."""
    world_size: int
    nbytes: tuple[int, ...]
    seconds: tuple[float, ...]
    """Median seconds of one all-reduce of each payload."""
    burst: int = 0
    """Bytes of the link's token bucket (0: unshaped)."""

    @property
    def link(self) -> Link:
        return Link(self.alpha, self.bandwidth)

    def predicted(self, nbytes: float) -> float:
        """The fitted time of one all-reduce of ``nbytes`` (bucket included)."""
        p = self.world_size
        return 2 * (p - 1) * self.alpha + max(2 * (p - 1) / p * nbytes - self.burst, 0) / self.bandwidth

    def errors(self) -> list[float]:
        """|predicted − measured| / measured at each probed size."""
        return [abs(self.predicted(n) - t) / t for n, t in zip(self.nbytes, self.seconds)]

    @property
    def worst_error(self) -> float:
        """The largest relative error over the probed sizes (an ignored hiccup included)."""
        return max(self.errors())

    @property
    def median_error(self) -> float:
        """The median relative error over the probed sizes."""
        return statistics.median(self.errors())

    def as_dict(self) -> dict[str, object]:
        return {
            "alpha_seconds": self.alpha,
            "bandwidth_bytes_per_second": self.bandwidth,
            "world_size": self.world_size,
            "burst_bytes": self.burst,
            "bytes": list(self.nbytes),
            "seconds": list(self.seconds),
            "worst_relative_error": self.worst_error,
            "median_relative_error": self.median_error,
        }


def fit_link(
    nbytes: Sequence[float], seconds: Sequence[float], world_size: int = 2, burst: int = 0
) -> LinkFit:
    """Fit T(n) = 2(p−1)·α + max(2(p−1)/p · n − burst, 0)/β to ``(nbytes, seconds)`` by
    least squares on the relative residuals (module docstring); ``ValueError`` with fewer
    than two sizes or a non-positive slope."""
    import numpy as np

    if len(nbytes) != len(seconds) or len(set(nbytes)) < 2:
        raise ValueError(f"need times of at least two payload sizes, got {list(nbytes)}")
    if world_size < 2:
        raise ValueError(f"a link needs world_size >= 2, got {world_size}")
    p = world_size
    t = np.asarray(seconds, dtype=float)
    if not (np.all(np.isfinite(t)) and np.all(t > 0)):
        raise ValueError(f"times must be finite and > 0, got {list(seconds)}")
    carried = np.maximum(2 * (p - 1) / p * np.asarray(nbytes, dtype=float) - burst, 0.0)
    if np.count_nonzero(carried) < 1 or len(set(carried.tolist())) < 2:
        raise ValueError(f"need payloads beyond the {burst}-byte bucket, got {list(nbytes)}")
    # Rows scaled by 1/t: least squares on the relative residuals r = (a + c·x − t) / t,
    # reweighted by 1/sqrt|r| until it settles: least absolute relative deviations, so that
    # one hiccup of a busy machine (a 4 KiB all-reduce that took 3 ms) does not move the line.
    design = np.stack([1 / t, carried / t], axis=1)
    weights = np.ones_like(t)
    first: tuple[float, float] | None = None
    for _ in range(IRLS_ROUNDS):
        (a, c), *_ = np.linalg.lstsq(design * weights[:, None], weights, rcond=None)
        first = first or (float(a), float(c))
        residuals = np.abs(design @ np.array([a, c]) - 1)
        weights = 1 / np.sqrt(np.maximum(residuals, IRLS_FLOOR))
    if not c > 0 and first is not None and first[1] > 0:
        # On a busy machine most small payloads can wait on the scheduler alike (every
        # 4 KiB-4 MiB all-reduce at ~3 ms): the reweighting then takes them for the line and
        # the large payloads for hiccups. Times do grow with the payload, so the plain fit on
        # relative residuals stands.
        a, c = first
    if not c > 0:
        raise ValueError(
            f"the probe's times do not grow with the payload (slope {c:.3g} s/B): {list(seconds)}"
        )
    alpha = max(float(a), 0.0) / (2 * (p - 1))
    return LinkFit(
        alpha, 1 / float(c), p, tuple(int(x) for x in nbytes), tuple(float(x) for x in seconds), burst
    )


def probe_sizes(rate_bits: float | None) -> list[int]:
    """Payloads from 4 KiB up by factors of 4 to what a link of ``rate_bits`` moves in
    about :data:`PROBE_SECONDS` (unshaped: 32 MiB), that last size included."""
    top = MAX_BYTES if rate_bits is None else int(min(max(rate_bits / 8 * PROBE_SECONDS, 2**20), MAX_BYTES))
    sizes = [MIN_BYTES]
    while sizes[-1] * 4 < top:
        sizes.append(sizes[-1] * 4)
    return [*sizes, top]


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured and the cluster it implies."""

    cluster: Cluster
    inter: LinkFit
    intra: LinkFit

    def as_dict(self) -> dict[str, object]:
        return {"cluster": self.cluster.name, "inter": self.inter.as_dict(), "intra": self.intra.as_dict()}


def _probe(
    cluster: EmulatedCluster, nodes: int, procs: int, sizes: list[int], reps: int, work: Path, burst: int
) -> LinkFit:
    out = work / f"probe-{nodes}x{procs}.json"
    where = cluster.placement(nodes, procs)
    args = [
        "-m",
        "localsgd.emulation.probe",
        str(out),
        "--sizes",
        ",".join(map(str, sizes)),
        "--reps",
        str(reps),
    ]
    rate = cluster.spec.rate_bits
    if burst and rate is not None:
        args += ["--pause", f"{2 * burst * 8 / rate + 1e-3:.6f}"]  # the bucket refills in between
    codes = cluster.run(args, where=where, log_dir=work / f"probe-{nodes}x{procs}", timeout=600)
    if any(codes) or not out.exists():
        logs = "\n".join(
            (work / f"probe-{nodes}x{procs}" / f"node{n}.log").read_text()[-2000:] for n in where.nodes
        )
        raise RuntimeError(
            f"the link probe on {nodes} node(s) × {procs} failed (exit codes {codes}):\n{logs}"
        )
    data = json.loads(out.read_text())
    return fit_link(data["bytes"], data["seconds"], int(data["world_size"]), burst)


def calibrate_codecs(threads: int = 1) -> dict[str, CodecCost]:
    """Every codec's work per value on this machine's CPU (``threads`` torch threads, as a
    worker process has), with error feedback (:func:`localsgd.comm.codecs.measure_codec`)."""
    import torch

    from localsgd.comm.codecs import Compression, codec_names, measure_codec

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {name: CodecCost(*measure_codec(Compression(codec=name))) for name in codec_names()[1:]}
    finally:
        torch.set_num_threads(before)


def calibrate(cluster: EmulatedCluster, *, reps: int = 7, name: str | None = None) -> Calibration:
    """Probe the inter-node link (2 nodes × 1 process) and a node's loopback (1 node × 2
    processes) of a running ``cluster``, time every codec on this machine's CPU, and return
    the cost model's view of it."""
    if cluster.nodes < 2:
        raise ValueError("calibrating the inter-node link needs an emulated cluster of at least 2 nodes")
    with tempfile.TemporaryDirectory(prefix="localsgd-probe-") as tmp:
        work = Path(tmp)
        burst = cluster.spec.bucket() if cluster.spec.rate is not None else 0
        inter = _probe(cluster, 2, 1, probe_sizes(cluster.spec.rate_bits), reps, work, burst)
        intra = _probe(cluster, 1, 2, probe_sizes(None), reps, work, 0)
    rate = cluster.spec.rate or "unshaped"
    g = cluster.procs_per_node
    described = (
        f"{cluster.nodes} emulated nodes × {g} processes, links {rate}"
        + (f" (tbf, burst {cluster.spec.bucket()} B)" if cluster.spec.rate else "")
        + f"; α, β fitted to gloo all-reduces of {inter.nbytes[0]}-{inter.nbytes[-1]} B between two nodes "
        f"(median error {inter.median_error:.1%}, worst {inter.worst_error:.1%}) and over a node's loopback "
        f"(median error {intra.median_error:.1%}, worst {intra.worst_error:.1%})"
    )
    result = Cluster(
        name=name or f"emulated-{cluster.nodes}x{g}-{rate}",
        devices_per_node=g,
        inter=inter.link,
        intra=intra.link,
        allreduce="ring",
        description=described + "; codecs timed on this machine's CPU, one thread",
        codecs=calibrate_codecs(),
    )
    return Calibration(result, inter, intra)


def nominal_gap(fit: LinkFit, rate_bits: float | None) -> float:
    """Measured β over the link's nominal rate (NaN when unshaped): how much of the line
    rate gloo's payload gets."""
    return math.nan if rate_bits is None else fit.bandwidth * 8 / rate_bits
