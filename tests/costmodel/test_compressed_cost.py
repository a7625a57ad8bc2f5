"""The cost model prices compressed averages as all-gathers of each rank's payload."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

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
    coded = {**row["by_scope"]["world"], "encoded": 800, "decoded": 2400, "codec_seconds": 0.02}
    assert row_counters({"by_scope": {"world": coded}}) == {"world": coded}
    plain = {"by_scope": {"world": {"collectives": 4, "bytes": 400, "seconds": 0.1}}}
    assert row_counters(plain) == {"world": {"collectives": 4, "bytes": 400, "seconds": 0.1}}


STUDY = """
[study]
name = "estimated"

[study.estimate]
cluster = "{cluster}"
train_samples = 12800
seconds_per_sample = {{ mnist1d_mlp = 1.0e-3 }}
parameters = {{ mnist1d_mlp = 1000000 }}

[base]
engine = "simulated"
workload = "mnist1d_mlp"

[base.data]
batch_size = 32

[base.train]
epochs = 3

[[grid]]
workers = [16]
algorithm = [
    {{ name = "local_sgd", period = 4 }},
    {{ name = "local_sgd", period = 4, compression = {{ codec = "int4" }} }},
    {{ name = "local_sgd", period = 4, compression = {{ codec = "topk", ratio = 0.01 }} }},
]
"""


def test_a_study_estimate_before_the_runs_prices_the_codec(tmp_path: Path) -> None:
    """``[study.estimate]``: a compressed run's planned syncs are all-gathers of the codec's
    payload (int4: 10⁶/2 codes and 8 bytes per block of 256; top-k 1 %: 10⁴ values and
    indices). On two nodes of eight (K = 16), an all-gather of int4 costs more than the
    hierarchical all-reduce of fp32, whose inter-node rings carry 1/M of the bytes each:
    a codec pays only past a K/2-fold reduction of the payload. Top-k's 50-fold does."""
    from localsgd.costmodel import collective_seconds, load_cluster
    from localsgd.studies.estimate import EstimateSection
    from localsgd.studies.estimate import estimate_run as estimate_planned
    from localsgd.studies.loading import load_study

    cluster_file = Path(__file__).resolve().parents[2] / "studies" / "clusters" / "v100x8_10gbe.toml"
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(cluster=cluster_file))
    study = load_study(path)
    section = study.section.estimate
    assert isinstance(section, EstimateSection)
    cluster = load_cluster(cluster_file)
    plain, int4, topk = (estimate_planned(run, section, cluster).comm_seconds for run in study.runs)
    syncs = 3 * 22 // 4  # 22 steps an epoch (see tests/studies/test_estimate.py)
    payload = 500_000 + 8 * math.ceil(1e6 / 256)
    assert plain == pytest.approx(syncs * collective_seconds(4e6, "world", 16, cluster), rel=1e-12)
    gather = gather_scope_cost("world", 16, cluster)
    assert int4 == pytest.approx(syncs * gather.seconds(payload), rel=1e-12)
    assert topk == pytest.approx(syncs * gather.seconds(8 * 10_000), rel=1e-12)
    assert topk < 0.5 * plain < plain < int4
    # A cluster that prices int4's work adds it per sync: 10⁶ values encoded, 17 payloads
    # decoded (16 members and its own, with error feedback).
    from localsgd.costmodel import CodecCost

    priced = dataclasses.replace(cluster, codecs={"int4": CodecCost(encode=4e-9, decode=2e-9)})
    worked = estimate_planned(study.runs[1], section, priced).comm_seconds
    assert worked == pytest.approx(int4 + syncs * (1e6 * 4e-9 + 17e6 * 2e-9), rel=1e-12)


def test_hidden_compute_hides_a_scope_with_gathers_per_mean_collective() -> None:
    """Overlap (``hidden``) on a scope that also counts all-gathers: each collective waits
    max(0, the scope's mean transfer − hidden), the all-reduces and all-gathers priced as
    without overlap; a scope without gathers keeps the per-collective formula."""
    cluster = Cluster("flat", 1, inter=WAN)
    k, n = 8, 1_000_000
    fp32 = 4 * n
    int8 = payload_bytes(Compression(codec="int8"), n)
    counters = {
        "world": {"collectives": 4, "bytes": 2 * fp32 + 2 * int8, "gathers": 2, "gathered_bytes": 2 * int8}
    }
    whole = comm_seconds(counters, k, cluster)
    expected = 2 * scope_cost("world", k, cluster).seconds(fp32) + 2 * gather_scope_cost(
        "world", k, cluster
    ).seconds(int8)
    assert whole == pytest.approx(expected, rel=1e-12)
    hide = whole / 4 / 3
    assert comm_seconds(counters, k, cluster, hidden={"world": hide}) == pytest.approx(
        4 * (whole / 4 - hide), rel=1e-12
    )
    assert comm_seconds(counters, k, cluster, hidden={"world": whole}) == 0.0


def test_a_codecs_work_is_priced_by_the_cluster_or_as_measured() -> None:
    """A compressed scope's ``encoded``/``decoded`` counters priced by the cluster's
    per-value costs for the run's codec; without them, the run's measured ``codec_seconds``
    (as compute without ``seconds_per_sample``); an uncompressed scope pays nothing."""
    from localsgd.costmodel import CodecCost

    counters = {
        "world": {
            "collectives": 4, "bytes": 4000, "gathers": 4, "gathered_bytes": 4000,
            "encoded": 8000, "decoded": 24000, "codec_seconds": 0.5,
        }
    }  # fmt: skip
    bare = Cluster("flat", 1, inter=WAN)
    priced = Cluster("flat", 1, inter=WAN, codecs={"int8": CodecCost(encode=2e-6, decode=1e-6)})
    transfer = 4 * allgather_cost(8, bare).latency + 4000 * allgather_cost(8, bare).per_byte
    assert comm_seconds(counters, 8, priced, codec="int8") == pytest.approx(transfer + 8000 * 2e-6 + 24000 * 1e-6)
    # Another codec than the one priced, or no codec named: the measured seconds.
    assert comm_seconds(counters, 8, priced, codec="int4") == pytest.approx(transfer + 0.5)
    assert comm_seconds(counters, 8, bare) == pytest.approx(transfer + 0.5)
    est = estimate_run(counters, 10, 8, 32, priced, 0.01, codec="int8")
    assert est.comm_seconds == pytest.approx(transfer + 0.04)
    plain = {"world": {"collectives": 4, "bytes": 4000}}
    assert comm_seconds(plain, 8, priced, codec="int8") == pytest.approx(4 * scope_cost("world", 8, bare).seconds(1000))
    with pytest.raises(ValueError, match=r"encode must be a finite number >= 0 seconds per value, got -1"):
        CodecCost(encode=-1, decode=0)


def test_a_cluster_file_carries_codec_costs(tmp_path: Path) -> None:
    from localsgd.costmodel import CodecCost, cluster_to_toml, load_cluster

    path = tmp_path / "lab.toml"
    text = "name = 'lab'\ndevices_per_node = 1\n[inter]\nalpha = 1e-5\nbandwidth_gbit = 1\n"
    path.write_text(text + "[codecs.int8]\nencode = 3e-9\ndecode = 1.5e-9\n")
    cluster = load_cluster(path)
    assert cluster.codecs == {"int8": CodecCost(3e-9, 1.5e-9)}
    again = tmp_path / "again.toml"
    again.write_text(cluster_to_toml(cluster))
    assert load_cluster(again) == cluster
    for table, message in [
        ("[codecs.int9]\nencode = 1\ndecode = 1\n", r"lab\.toml': unknown key 'codecs\.int9': not a codec; allowed: \['fp16'"),
        ("[codecs.int8]\nencode = 1\n", r"missing key 'codecs\.int8\.decode'"),
        ("[codecs.int8]\nencode = 1\ndecode = -2\n", r"codecs\.int8\.decode must be a finite number >= 0"),
    ]:
        path.write_text(text + table)
        with pytest.raises(ValueError, match=message):
            load_cluster(path)
