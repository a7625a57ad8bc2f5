"""The cost model prices compressed averages as all-gathers of each rank's payload."""

from __future__ import annotations

import pytest

from localsgd.comm.codecs import Compression, payload_bytes
from localsgd.costmodel import (
    GBIT,
    Cluster,
    Link,
    allgather_cost,
    comm_seconds,
    estimate_run,
    gather_scope_cost,
    scope_cost,
)
from localsgd.report.tables import row_counters

WAN = Link(alpha=1e-3, bandwidth=1 * GBIT)
NVLINK = Link(alpha=1e-5, bandwidth=100 * GBIT)


def test_a_ring_all_gather_by_hand() -> None:
    """8 single-device nodes, 1 MB per rank: 7 steps of α + 1 MB/β."""
    cluster = Cluster("flat", 1, inter=WAN)
    cost = allgather_cost(8, cluster)
    assert cost.seconds(1e6) == pytest.approx(7 * (1e-3 + 1e6 / (1 * GBIT)), rel=1e-12)
    assert allgather_cost(1, cluster).seconds(1e6) == 0.0


def test_hierarchical_all_gather_by_hand() -> None:
    """2 nodes of 4: a ring of 2 over the WAN per local rank, then each node gathers the 2
    payloads of its 4 devices over NVLink."""
    cluster = Cluster("two-by-four", 4, inter=WAN, intra=NVLINK, allreduce="hierarchical")
    n = 1e6
    expected = (1e-3 + n / WAN.bandwidth) + 3 * (1e-5 + 2 * n / NVLINK.bandwidth)
    assert allgather_cost(8, cluster).seconds(n) == pytest.approx(expected, rel=1e-12)
    # A block of 4 inside a node gathers on NVLink alone.
    assert gather_scope_cost("block4", 8, cluster).seconds(n) == pytest.approx(
        3 * (1e-5 + n / NVLINK.bandwidth)
    )


def test_counters_with_gathers_are_priced_as_all_gathers() -> None:
    """A run's scope counts its compressed averages apart (dp.stats' ``gathers`` and
    ``gathered_bytes``): those cost an all-gather, the rest an all-reduce, and a scope
    without them costs what it always did."""
    cluster = Cluster("flat", 1, inter=WAN)
    k, n = 8, 1_000_000
    fp32 = 4 * n
    int8 = payload_bytes(Compression(codec="int8"), n)
    plain = {"world": {"collectives": 10, "bytes": 10 * fp32}}
    reduce = scope_cost("world", k, cluster)
    assert comm_seconds(plain, k, cluster) == pytest.approx(10 * reduce.seconds(fp32), rel=1e-12)
    mixed = {
        "world": {
            "collectives": 13,
            "bytes": 10 * int8 + 3 * fp32,
            "gathers": 10,
            "gathered_bytes": 10 * int8,
        }
    }
    gather = gather_scope_cost("world", k, cluster)
    expected = 10 * gather.seconds(int8) + 3 * reduce.seconds(fp32)
    assert comm_seconds(mixed, k, cluster) == pytest.approx(expected, rel=1e-12)
    # At K = 8, int8's all-gather moves 7·(n + n/32) bytes per rank and the fp32
    # all-reduce 2·7/8·4n = 7n: about the same bandwidth time, half the latency; int4
    # halves the bytes.
    beta = WAN.bandwidth
    assert int8 == n + 8 * 3907  # 3907 blocks of 256, the last one partial
    assert gather.seconds(int8) == pytest.approx(7 * 1e-3 + 7 * int8 / beta, rel=1e-12)
    assert reduce.seconds(fp32) == pytest.approx(14 * 1e-3 + 7 * n / beta, rel=1e-12)
    int4 = payload_bytes(Compression(codec="int4"), n)
    assert gather.seconds(int4) < 0.6 * reduce.seconds(fp32)
    est = estimate_run(mixed, 100, k, 32, cluster, 0.0)
    assert est.comm_seconds == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="counts more gathers"):
        comm_seconds(
            {"world": {"collectives": 1, "bytes": 10, "gathers": 2, "gathered_bytes": 10}}, k, cluster
        )


def test_a_metrics_rows_counters_keep_the_gathers_for_the_report() -> None:
    row = {
        "by_scope": {
            "world": {"collectives": 4, "bytes": 400, "seconds": 0.1, "gathers": 4, "gathered_bytes": 400}
        }
    }
    assert row_counters(row) == {
        "world": {"collectives": 4, "bytes": 400, "seconds": 0.1, "gathers": 4, "gathered_bytes": 400}
    }
    plain = {"by_scope": {"world": {"collectives": 4, "bytes": 400, "seconds": 0.1}}}
    assert row_counters(plain) == {"world": {"collectives": 4, "bytes": 400, "seconds": 0.1}}
