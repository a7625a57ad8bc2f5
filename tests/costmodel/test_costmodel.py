"""The network cost model: hand-computed all-reduce times, hierarchy, scopes, linearity in
the counters, presets and their documented sources, cluster TOML files."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from localsgd.costmodel import (
    GBIT,
    Cluster,
    Estimate,
    Link,
    allreduce_seconds,
    check_delay,
    cluster_from_dict,
    cluster_to_dict,
    cluster_to_toml,
    collective_seconds,
    comm_seconds,
    estimate_run,
    load_cluster,
    preset,
    presets,
    ring_allreduce_seconds,
    scope_cost,
    scope_size,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "costmodel.md"
MB100 = 100e6  # 100 MB payload per rank (decimal megabytes)


def test_100mb_over_16_workers_on_10gbe_by_hand() -> None:
    # 10 GbE: α = 50 µs, β = 10 Gb/s = 10e9 / 8 = 1.25e9 B/s.
    # Ring all-reduce, p = 16: 2(p−1)·α = 2·15·50e-6 = 1.5e-3 s;
    # 2(p−1)/p · n/β = 2·15/16 · 1e8/1.25e9 = 1.875 · 0.08 = 0.15 s.  Total 0.1515 s.
    expected = 2 * 15 * 50e-6 + 2 * 15 / 16 * 1e8 / 1.25e9
    assert expected == pytest.approx(0.1515, rel=1e-12)
    cluster = preset("10gbe")
    assert cluster.inter == Link(alpha=50e-6, bandwidth=1.25e9)
    assert ring_allreduce_seconds(MB100, 16, cluster.inter) == pytest.approx(expected, rel=1e-12)
    # One worker per machine: the world all-reduce is that ring on the inter-node link.
    assert allreduce_seconds(MB100, 16, cluster) == pytest.approx(expected, rel=1e-12)
    assert collective_seconds(MB100, "world", 16, cluster) == pytest.approx(expected, rel=1e-12)


def test_one_participant_costs_nothing() -> None:
    link = Link(alpha=1.0, bandwidth=1.0)
    assert ring_allreduce_seconds(MB100, 1, link) == 0.0
    for name in presets():
        cluster = preset(name)
        assert allreduce_seconds(MB100, 1, cluster) == 0.0
        assert collective_seconds(MB100, "block1", 4, cluster) == 0.0
        est = estimate_run({"world": {"collectives": 0, "bytes": 0}}, 100, 1, 32, cluster, 0.01)
        assert est == Estimate(
            compute_seconds=pytest.approx(1.0), comm_seconds=0.0, total_seconds=pytest.approx(1.0)
        )


def test_hierarchical_two_nvlink_nodes_of_eight_by_hand() -> None:
    cluster = preset("nvlink-node")
    assert cluster.devices_per_node == 8
    a_i, b_i = 2e-6, 235e9  # NVLink: α = 2 µs, β = 235 GB/s
    a_e, b_e = 5e-6, 100e9 / 8  # IB EDR: α = 5 µs, β = 100 Gb/s = 12.5e9 B/s
    assert cluster.intra == Link(a_i, b_i) and cluster.inter == Link(a_e, b_e)
    n, g, nodes = MB100, 8, 2
    # Intra-node reduce-scatter: (M−1)(α_i + n/(M β_i)) = 7·(2e-6 + 1e8/1.88e12).
    reduce_scatter = 7 * (2e-6 + 1e8 / (8 * 235e9))
    # Inter-node ring over N = 2 nodes on the n/M = 12.5 MB shards:
    # 2(N−1)·α_e + 2(N−1)/N · (n/M)/β_e = 2·5e-6 + 1 · 12.5e6/12.5e9 = 1e-5 + 1e-3.
    across = 2 * (nodes - 1) * a_e + 2 * (nodes - 1) / nodes * (n / g) / b_e
    assert across == pytest.approx(1.01e-3, rel=1e-12)
    all_gather = reduce_scatter
    expected = reduce_scatter + across + all_gather
    assert expected == pytest.approx(2 * 7 * (2e-6 + 1e8 / 1.88e12) + 1.01e-3, rel=1e-12)
    assert allreduce_seconds(n, 16, cluster) == pytest.approx(expected, rel=1e-12)
    assert scope_cost("world", 16, cluster).seconds(n) == pytest.approx(expected, rel=1e-12)
    # One node (N = 1): a ring on NVLink; fewer workers than M: one node of K devices.
    assert allreduce_seconds(n, 8, cluster) == pytest.approx(2 * 7 * a_i + 2 * 7 / 8 * n / b_i, rel=1e-12)
    assert allreduce_seconds(n, 4, cluster) == pytest.approx(2 * 3 * a_i + 2 * 3 / 4 * n / b_i, rel=1e-12)
    # A partly filled last node (12 = 8 + 4): one flat ring at the inter-node link's pace.
    assert allreduce_seconds(n, 12, cluster) == pytest.approx(2 * 11 * a_e + 2 * 11 / 12 * n / b_e, rel=1e-12)
    assert (
        cluster.placement(16) == (2, 8) and cluster.placement(4) == (1, 4) and cluster.placement(12) == (2, 8)
    )


def test_block_scopes() -> None:
    nvlink = preset("nvlink-node")
    intra = nvlink.intra
    assert intra is not None
    n = 4e6
    # Blocks of 4 consecutive ranks lie inside one 8-GPU node: a ring over 4 on NVLink.
    ring4 = 2 * 3 * intra.alpha + 2 * 3 / 4 * n / intra.bandwidth
    assert collective_seconds(n, "block4", 16, nvlink) == pytest.approx(ring4, rel=1e-12)
    assert scope_cost("block4", 16, nvlink).seconds(n) == pytest.approx(ring4, rel=1e-12)
    assert collective_seconds(n, "block8", 16, nvlink) == pytest.approx(
        ring_allreduce_seconds(n, 8, intra), rel=1e-12
    )
    # A block larger than a node is costed like a world all-reduce over b ranks.
    assert collective_seconds(n, "block16", 32, nvlink) == pytest.approx(allreduce_seconds(n, 16, nvlink))
    # One worker per machine: a block of 2 is a ring over 2 on the network.
    flat = preset("10gbe")
    assert collective_seconds(n, "block2", 4, flat) == pytest.approx(
        2 * 50e-6 + 2 * 1 / 2 * n / 1.25e9, rel=1e-12
    )
    # Nodes of 6: blocks of 4 straddle nodes ([4, 8) spans two), so their ring runs at the
    # inter-node link's pace.
    six = Cluster("six", 6, inter=Link(1e-5, 1e9), intra=Link(1e-6, 1e11))
    assert collective_seconds(n, "block4", 12, six) == pytest.approx(ring_allreduce_seconds(n, 4, six.inter))
    assert collective_seconds(n, "block3", 12, six) == pytest.approx(ring_allreduce_seconds(n, 3, six.intra))
    assert scope_size("world", 12) == 12 and scope_size("block3", 12) == 3
    with pytest.raises(ValueError, match="unknown scope 'node'"):
        scope_size("node", 4)
    with pytest.raises(ValueError, match="does not divide the 4 workers"):
        scope_size("block3", 4)


@pytest.mark.parametrize("name", ["10gbe", "nvlink-node", "wan"])
def test_estimate_is_linear_in_the_counters(name: str) -> None:
    cluster = preset(name)
    workers, n_world, n_block = 16, 2.5e6, 2.5e6
    counters = {
        "world": {"collectives": 37, "bytes": 37 * n_world, "seconds": 123.0},
        "block4": {"collectives": 111, "bytes": 111 * n_block},
    }
    # The per-collective formula, summed over the run's equal-size collectives.
    by_hand = 37 * collective_seconds(n_world, "world", workers, cluster) + 111 * collective_seconds(
        n_block, "block4", workers, cluster
    )
    assert comm_seconds(counters, workers, cluster) == pytest.approx(by_hand, rel=1e-12)
    # Additive: the estimate of a run equals the sum over any split of its counters.
    first = {
        "world": {"collectives": 30, "bytes": 30 * n_world},
        "block4": {"collectives": 11, "bytes": 11 * n_block},
    }
    rest = {
        "world": {"collectives": 7, "bytes": 7 * n_world},
        "block4": {"collectives": 100, "bytes": 100 * n_block},
    }
    assert comm_seconds(first, workers, cluster) + comm_seconds(rest, workers, cluster) == pytest.approx(
        comm_seconds(counters, workers, cluster), rel=1e-12
    )
    est = estimate_run(counters, steps=400, workers=workers, batch_size=64, cluster=cluster,
                       measured_compute_per_step=0.02)  # fmt: skip
    assert est.compute_seconds == pytest.approx(400 * 0.02)
    assert est.comm_seconds == pytest.approx(by_hand, rel=1e-12)
    assert est.total_seconds == pytest.approx(est.compute_seconds + est.comm_seconds)


def test_a_flat_ring_across_nodes_by_hand() -> None:
    # gloo runs every all-reduce as one ring over all p ranks in rank order. On 2 nodes of
    # M = 2 the ring 0 -> 1 -> 2 -> 3 -> 0 crosses nodes twice, each hop in its own
    # direction, so every step runs at the inter-node link's pace:
    # T = 2(p−1)·α_e + 2(p−1)/p · n/β_e = 6·α_e + 1.5·n/β_e.
    inter, intra = Link(1e-4, 100e6 / 8), Link(1e-5, 2e9)
    ring = Cluster("emulated", 2, inter=inter, intra=intra, allreduce="ring")
    n = 20e6
    expected = 6 * 1e-4 + 1.5 * n / (100e6 / 8)
    assert expected == pytest.approx(2.4006, rel=1e-12)
    assert allreduce_seconds(n, 4, ring) == pytest.approx(expected, rel=1e-12)
    assert collective_seconds(n, "world", 4, ring) == pytest.approx(expected, rel=1e-12)
    assert scope_cost("world", 4, ring).seconds(n) == pytest.approx(expected, rel=1e-12)
    # Blocks of one node stay on the intra-node link: T_ring(n, 2) = 2·α_i + n/β_i.
    assert collective_seconds(n, "block2", 4, ring) == pytest.approx(2 * 1e-5 + n / 2e9, rel=1e-12)
    # The hierarchical default runs the two shards' inter-node rings concurrently instead.
    hier = dataclasses.replace(ring, allreduce="hierarchical")
    assert allreduce_seconds(n, 4, hier) < allreduce_seconds(n, 4, ring)
    with pytest.raises(ValueError, match=r"allreduce must be one of \['hierarchical', 'ring'\], got 'tree'"):
        dataclasses.replace(ring, allreduce="tree")


def test_a_parameter_servers_pushes_and_pulls_share_its_links_by_hand() -> None:
    # 10 GbE, one worker per machine, K = 4: the server (rank 0's machine) carries the three
    # other workers' transfers over its link, one after another: per byte of one worker's
    # transfer 3/β; latency α. 10 pushes and 11 pulls of 4 MB each (the final pull besides).
    flat = preset("10gbe")
    cost = scope_cost("push", 4, flat)
    assert (cost.latency, cost.per_byte) == pytest.approx((50e-6, 3 / 1.25e9))
    assert scope_cost("pull", 4, flat) == cost and scope_size("push", 4) == 4
    expected = 21 * 50e-6 + 3 * (10 + 11) * 4e6 / 1.25e9
    counters = {"push": {"collectives": 10, "bytes": 40e6}, "pull": {"collectives": 11, "bytes": 44e6}}
    assert comm_seconds(counters, 4, flat) == pytest.approx(expected, rel=1e-12)
    assert collective_seconds(4e6, "pull", 4, flat) == pytest.approx(50e-6 + 3 * 4e6 / 1.25e9, rel=1e-12)
    # One worker: the server is in its own process.
    assert comm_seconds(counters, 1, flat) == 0.0
    # Nodes of 8 on 2 × 8: the seven other workers of the server's node share its intra
    # link, the eight of the other node its inter link; the busier of the two sets the pace.
    node = Cluster("two", 8, inter=Link(5e-6, 25 * GBIT), intra=Link(1e-6, 300 * GBIT))
    cost = scope_cost("push", 16, node)
    assert (cost.latency, cost.per_byte) == pytest.approx((5e-6, max(8 / (25 * GBIT), 7 / (300 * GBIT))))
    one_node = scope_cost("push", 4, node)
    assert (one_node.latency, one_node.per_byte) == pytest.approx((1e-6, 3 / (300 * GBIT)))


def test_injected_delay_adds_seconds_per_collective_of_its_scope() -> None:
    cluster = Cluster("emulated", 2, inter=Link(1e-4, 1.25e7), intra=Link(1e-5, 2e9), allreduce="ring")
    counters = {
        "world": {"collectives": 3, "bytes": 3 * 1e6},
        "block2": {"collectives": 9, "bytes": 9 * 1e6},
    }
    plain = comm_seconds(counters, 4, cluster)
    # 1 s per global collective, 0.25 s per block collective: 3·1 + 9·0.25 = 5.25 s more.
    delayed = comm_seconds(counters, 4, cluster, {"world": 1.0, "block2": 0.25})
    assert delayed - plain == pytest.approx(5.25, rel=1e-12)
    assert comm_seconds(counters, 4, cluster, {"world": 0.0}) == plain
    est = estimate_run(counters, 48, 4, 32, cluster, 0.01, delay={"world": 1.0})
    assert est.comm_seconds == pytest.approx(plain + 3.0, rel=1e-12)
    assert est.total_seconds == pytest.approx(0.48 + plain + 3.0, rel=1e-12)
    assert check_delay(None, 4) == {} and check_delay({"block2": 1}, 4) == {"block2": 1.0}
    with pytest.raises(ValueError, match=r"delay\.world must be a finite number >= 0 seconds, got -1"):
        comm_seconds(counters, 4, cluster, {"world": -1})
    with pytest.raises(ValueError, match=r"comm\.delay\.node: unknown scope 'node'"):
        check_delay({"node": 1.0}, 4, "comm.delay")
    with pytest.raises(ValueError, match=r"delay\.block3: scope 'block3': block size 3 does not divide"):
        check_delay({"block3": 1.0}, 4)
    with pytest.raises(ValueError, match=r"delay\.world must be a finite number"):
        check_delay({"world": float("inf")}, 4)


def test_compute_from_the_cluster_takes_precedence_over_the_measurement() -> None:
    cluster = dataclasses.replace(preset("10gbe"), seconds_per_sample=1e-4)
    est = estimate_run(
        {}, steps=100, workers=4, batch_size=32, cluster=cluster, measured_compute_per_step=9.0
    )
    assert est.compute_seconds == pytest.approx(100 * 32 * 1e-4) and est.comm_seconds == 0.0
    with pytest.raises(ValueError, match="measured_compute_per_step is required"):
        estimate_run({}, 100, 4, 32, preset("10gbe"))
    assert math.isnan(estimate_run({}, 100, 4, 32, preset("10gbe"), math.nan).total_seconds)
    with pytest.raises(ValueError, match="steps must be"):
        estimate_run({}, -1, 4, 32, cluster)


def test_presets_and_their_sources_are_documented() -> None:
    assert presets() == ["10gbe", "25gbe", "100g-ib", "nvlink-node", "wan"]
    expected = {  # name: (M, inter α, inter β in Gb/s)
        "10gbe": (1, 50e-6, 10),
        "25gbe": (1, 50e-6, 25),
        "100g-ib": (1, 5e-6, 100),
        "nvlink-node": (8, 5e-6, 100),
        "wan": (1, 50e-3, 1),
    }
    for name, (g, alpha, gbit) in expected.items():
        cluster = preset(name)
        assert (cluster.devices_per_node, cluster.inter.alpha) == (g, alpha), name
        assert cluster.inter.bandwidth == pytest.approx(gbit * GBIT), name
        assert cluster.description, name
    text = DOCS.read_text()
    for name in presets():
        assert f"`{name}`" in text, name
    for source in ("802.3ae", "802.3by", "EDR", "NVLink", "tuning.cc", "Thakur", "Patarasuk", "typical"):
        assert source in text, source
    with pytest.raises(ValueError, match="allowed: 10gbe, 25gbe, 100g-ib, nvlink-node, wan"):
        preset("infiniband")


def test_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        Link(alpha=-1e-6, bandwidth=1e9)
    with pytest.raises(ValueError, match="bandwidth must be a finite number > 0"):
        Link(alpha=0.0, bandwidth=0)
    with pytest.raises(ValueError, match="devices_per_node must be an integer >= 1"):
        Cluster("x", 0, inter=Link(0, 1))
    with pytest.raises(ValueError, match="intra is required when devices_per_node > 1"):
        Cluster("x", 2, inter=Link(0, 1))
    with pytest.raises(ValueError, match="seconds_per_sample must be a finite number > 0"):
        Cluster("x", 1, inter=Link(0, 1), seconds_per_sample=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("wan").devices_per_node = 2  # type: ignore[misc]


CLUSTER_TOML = """
name = "lab"
devices_per_node = 4
seconds_per_sample = 2.0e-5
description = "four GPUs per box on PCIe, 25 GbE between boxes"

[intra]
alpha = 3.0e-6
bandwidth_gbit = 200

[inter]
alpha = 5.0e-5
bandwidth_gbit = 25
"""


def test_cluster_toml(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(CLUSTER_TOML)
    cluster = load_cluster(path)
    assert cluster == load_cluster(str(path))
    assert cluster.name == "lab" and cluster.devices_per_node == 4
    assert cluster.intra == Link(alpha=3e-6, bandwidth=200e9 / 8)
    assert cluster.inter == Link(alpha=5e-5, bandwidth=25e9 / 8)
    assert cluster.seconds_per_sample == 2e-5
    for name in presets():
        assert cluster_from_dict(cluster_to_dict(preset(name))) == preset(name)
    assert cluster_from_dict(cluster_to_dict(cluster)) == cluster
    assert cluster.allreduce == "hierarchical" and "allreduce" not in cluster_to_dict(cluster)
    ring = dataclasses.replace(cluster, allreduce="ring")
    assert cluster_to_dict(ring)["allreduce"] == "ring"
    assert cluster_from_dict(cluster_to_dict(ring)) == ring
    # Written as a file and read back, every float keeps its digits.
    odd = dataclasses.replace(ring, inter=Link(alpha=1.234567890123e-4, bandwidth=1.1e7), description='a "q"')
    path.write_text(cluster_to_toml(odd, comment="calibrated\non a test"))
    assert path.read_text().startswith("# calibrated\n# on a test\nname = ")
    assert load_cluster(path) == odd
    assert load_cluster("nvlink-node") is preset("nvlink-node")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: "gpus = 8\n" + t,
            r"unknown key 'gpus'; allowed: \['allreduce', 'codecs', 'description', 'devices_per_node'",
        ),
        (lambda t: 'allreduce = "tree"\n' + t, r"allreduce must be one of \['hierarchical', 'ring'\]"),
        (
            lambda t: t.replace("bandwidth_gbit = 25", "bandwidth = 25"),
            r"unknown key 'inter\.bandwidth'; allowed: \['alpha', 'bandwidth_gbit'\]",
        ),
        (
            lambda t: t.replace("bandwidth_gbit = 25", "bandwidth_gbit = -25"),
            "inter.bandwidth_gbit must be a finite number > 0",
        ),
        (
            lambda t: t.replace("alpha = 3.0e-6", "alpha = -3.0e-6"),
            "intra.alpha must be a finite number >= 0",
        ),
        (lambda t: t.replace("alpha = 5.0e-5\n", ""), "missing key 'inter.alpha'"),
        (lambda t: t.replace('name = "lab"', ""), "missing key 'name'"),
        (lambda t: t.split("[inter]")[0], "missing key 'inter'"),
        (lambda t: t.replace("[intra]", "[unused]"), "unknown key 'unused'"),
        (
            lambda t: t.replace("devices_per_node = 4", "devices_per_node = 0"),
            "devices_per_node must be an integer >= 1",
        ),
        (
            lambda t: t.replace("devices_per_node = 4", 'devices_per_node = "4"'),
            "devices_per_node must be an integer",
        ),
        (
            lambda t: t.replace("seconds_per_sample = 2.0e-5", "seconds_per_sample = 0"),
            "seconds_per_sample must be",
        ),
        (lambda t: t.replace("bandwidth_gbit = 25", "bandwidth_gbit = true"), "inter.bandwidth_gbit must be"),
        (lambda t: t.replace("[intra]", "[intra"), "cluster file .*: Expected ']'"),
    ],
)
def test_cluster_toml_errors(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.toml"
    path.write_text(edit(CLUSTER_TOML))
    with pytest.raises(ValueError, match=message) as info:
        load_cluster(path)
    assert str(path) in str(info.value)


def test_intra_is_required_for_several_devices_per_node() -> None:
    with pytest.raises(ValueError, match="missing key 'intra'"):
        cluster_from_dict({"name": "x", "devices_per_node": 2, "inter": {"alpha": 0, "bandwidth_gbit": 1}})
    flat = cluster_from_dict({"name": "x", "devices_per_node": 1, "inter": {"alpha": 0, "bandwidth_gbit": 1}})
    assert flat.intra is None and flat.inter.bandwidth == GBIT


def test_unknown_name_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown cluster 'ethernet': not a preset \(one of 10gbe, 25gbe"):
        load_cluster("ethernet")
    with pytest.raises(ValueError, match="does not exist"):
        load_cluster(str(tmp_path / "nowhere.toml"))


def test_import_is_light() -> None:
    code = "import sys, localsgd.costmodel; print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_overlap_hides_what_tau_steps_of_compute_cover_per_collective() -> None:
    # 1 MB over a 12.5 MB/s ring of 4: each world collective moves 2·3/4 MB, about 0.12 s.
    cluster = Cluster("slow", 1, inter=Link(1e-3, 1.25e7), intra=Link(1e-5, 2e9), allreduce="ring")
    counters = {"world": {"collectives": 6, "bytes": 6 * 1e6}, "block2": {"collectives": 4, "bytes": 4e6}}
    transfer = scope_cost("world", 4, cluster).seconds(1e6)
    plain = comm_seconds(counters, 4, cluster)
    hide = 0.05
    partly = comm_seconds(counters, 4, cluster, hidden={"world": hide})
    assert plain - partly == pytest.approx(6 * hide, rel=1e-12)  # the block scope is untouched
    gone = comm_seconds(counters, 4, cluster, hidden={"world": 10.0})
    assert gone == pytest.approx(plain - 6 * transfer, rel=1e-12)
    # τ steps of the run's compute per step: 2 × (32 × 1e-3 s) hide 0.064 s per collective.
    est = estimate_run(counters, 40, 4, 32, cluster, 1e-3 * 32, overlap={"world": 2})
    assert est.comm_seconds == pytest.approx(plain - 6 * min(transfer, 2 * 32e-3), rel=1e-12)
    assert est.compute_seconds == pytest.approx(40 * 32e-3)
    assert estimate_run(counters, 40, 4, 32, cluster, 32e-3, overlap={"world": 0}).comm_seconds == plain
    assert math.isnan(comm_seconds(counters, 4, cluster, hidden={"world": math.nan}))
