"""FSDP2-sharded models on a 2 × 2 mesh (replicate × shard), 4 gloo processes under torchrun:
each algorithm averages the local shards over the replicate group and ends where the same
algorithm ends on the unsharded model with 2 replicas on the same data; one collective per
sync of the local shard's bytes; a saved state resumes to the same bits.

One launch runs every scenario (``fsdp_parity.py``); the tests read its per-rank results.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import localsgd
from harness import finished, free_port, launch
from localsgd import algorithms
from localsgd.comm.sharding import replicate_communicator
from localsgd.comm.solo import SoloCommunicator

pytest.importorskip("torch.distributed.fsdp")

# One worker runs the module, so that the launch behind its module fixture runs once per session.
pytestmark = pytest.mark.xdist_group("fsdp")

SCRIPT = Path(__file__).with_name("fsdp_parity.py")
WORLD = 4
TIMEOUT = 400
# The shard group's gradient is the mean of two half-batch means (FSDP's reduce-scatter),
# the reference's the whole batch's mean: float32 sums in another order.
ATOL = 1e-6
SCENARIOS = [
    "local_sgd", "local_sgd_avg_state", "diloco", "slowmo", "minibatch", "post_local_sgd", "sma", "two_dtypes",
]  # fmt: skip


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp")
    torchrun = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD)]
    loopback = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    proc = launch([*torchrun, *loopback, str(SCRIPT), str(out)], TIMEOUT)
    files = [out / f"rank{r}.pt" for r in range(WORLD)]
    assert finished(proc, files), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(f, weights_only=False) for f in files]


def test_mesh_layout(ranks):
    assert [(r["replica"], r["half"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("name", SCENARIOS)
def test_sharded_run_equals_the_unsharded_run(ranks, name):
    for r in ranks:
        got, expected = r[name]["params"], r[name]["reference"]["params"]
        assert [t.shape for t in got] == [t.shape for t in expected]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
        # The consensus model between two syncs (evaluation) too.
        for a, b in zip(r[name]["consensus"], r[name]["reference"]["consensus"]):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    # Every rank ends on the consensus model, whichever replica and shard it holds.
    for r in ranks[1:]:
        for a, b in zip(r[name]["params"], ranks[0][name]["params"]):
            assert torch.equal(a, b)


def test_the_algorithms_end_apart(ranks):
    """The tolerance is far below what tells the algorithms apart."""
    finals = {name: ranks[0][name]["params"] for name in SCENARIOS}
    for name in ("local_sgd", "diloco", "slowmo", "post_local_sgd", "sma"):
        gap = max((a - b).abs().max().item() for a, b in zip(finals[name], finals["minibatch"]))
        assert gap > 1000 * ATOL, name


@pytest.mark.parametrize(
    "name, syncs, per_sync",
    [
        # H = 2 over 5 steps: syncs after steps 2 and 4, and on leaving.
        ("local_sgd", 3, 1),
        ("diloco", 3, 1),
        ("slowmo", 3, 1),
        ("local_sgd_avg_state", 3, 2),  # SGD's momentum buffers travel with the parameters
        ("minibatch", 5, 1),
        ("post_local_sgd", 4, 1),  # gradients at steps 1 and 2, models after 4, and on leaving
        ("sma", 5, 1),  # the corrections, every step
    ],
)
def test_one_collective_per_sync_of_the_local_shard(ranks, name, syncs, per_sync):
    for r in ranks:
        stats, shard_bytes = r[name]["stats"], r[name]["shard_bytes"]
        assert stats["steps"] == 5 and stats["syncs"] == syncs
        assert stats["collectives"] == syncs  # one dtype: one collective per sync
        assert stats["bytes"] == syncs * per_sync * shard_bytes
        assert stats["by_scope"].keys() == {"world"}
        # The unsharded replica sends the whole model: the two shards' bytes together.
        ref = r[name]["reference"]["stats"]
        assert (ref["syncs"], ref["collectives"]) == (syncs, syncs)
    # The last weight (3 × 8) splits 2 + 1 rows: the shard ranks send unequal payloads.
    model_bytes = ranks[0]["local_sgd"]["reference"]["stats"]["bytes"] // 3
    assert ranks[0]["local_sgd"]["shard_bytes"] + ranks[1]["local_sgd"]["shard_bytes"] == model_bytes
    assert ranks[0]["local_sgd"]["shard_bytes"] != ranks[1]["local_sgd"]["shard_bytes"]


def test_state_dict_resumes_to_the_same_bits(ranks):
    for r in ranks:
        resume = r["resume"]
        for a, b in zip(resume["straight"], resume["resumed"]):
            assert torch.equal(a, b)
        for a, b in zip(resume["ended"], resume["resumed_ended"]):
            assert torch.equal(a, b)


def test_one_collective_per_dtype(ranks):
    """float32 and float64 layers: two collectives per sync, each of that dtype's shards."""
    for r in ranks:
        stats = r["two_dtypes"]["stats"]
        assert stats["syncs"] == 3 and stats["collectives"] == 6
        assert stats["bytes"] == 3 * r["two_dtypes"]["shard_bytes"]
        assert r["two_dtypes"]["reference"]["stats"]["collectives"] == 6
        assert [t.dtype for t in r["two_dtypes"]["params"]] == [torch.float32] * 2 + [torch.float64] * 2


def test_refusals_name_the_fix(ranks):
    said = ranks[0]["refusals"]
    fix = 'shard with fully_shard(module, mesh=mesh["shard"]) and pass DataParallel(..., mesh=mesh)'
    # fully_shard over the whole mesh: the first layer's weight spans all four ranks.
    assert said["hsdp"].startswith("a parameter of shape (8, 6) is placed over ranks [0, 2], of which [0, 2]")
    assert said["hsdp"].endswith(fix)
    # mesh= left out: the world's group holds both shards of a replica.
    assert said["world"] == (
        "a parameter of shape (8, 6) is placed over ranks [0, 1], of which [0, 1] are in the group "
        "the algorithm averages over [0, 1, 2, 3]: an average would mix different shards, or FSDP "
        "would average it every step (HSDP); " + fix
    )
    assert said["gradient_accumulation"] == (
        "algorithm 'gradient_accumulation' does not run on a sharded (FSDP2) model"
    )


def test_another_ranks_state_is_refused(ranks):
    """The other shard rank's state has the same shapes for the first layer's tensors: only
    the recorded layout tells the slices apart."""
    for r in ranks:
        mine, other = r["half"], 1 - r["half"]
        assert r["resume"]["mixed_up"] == (
            f"state replica '0.bias' was saved as shard [[8], ['S(0)'], [{other}]] (global shape, "
            f"placements, mesh coordinate); this rank holds [[8], ['S(0)'], [{mine}]]: load each "
            "rank's own state, on the same mesh and sharding"
        )


def test_accelerate_drop_in_runs_a_model_sharded_within_replicas(ranks):
    pytest.importorskip("accelerate")
    for r in ranks:
        ours = r["accelerate"]
        # The same algorithm, data and sharding as the local_sgd scenario: the same bits.
        for a, b in zip(ours["params"], r["local_sgd"]["params"]):
            assert torch.equal(a, b)
        assert ours["stats"]["syncs"] == 3 and ours["stats"]["collectives"] == 3
        assert ours["stats"]["bytes"] == 3 * r["local_sgd"]["shard_bytes"]
        said = ours["refusals"]
        assert said["fsdp1"] == (
            "LocalSGD is supported for CPUs and GPUs and for FSDP2 (fsdp_version=2) models "
            "sharded within replicas; not for DeepSpeed, MegatronLM or FSDP1"
        )
        assert said["no_replicas"].startswith("a sharded (FSDP2) model needs replicas to average: ")
        assert said["no_replicas"].endswith("before accelerator.prepare (the mesh has dimensions ())")


def test_mesh_and_comm_are_exclusive():
    model = nn.Linear(2, 2)
    with pytest.raises(
        ValueError, match=r"^give mesh= or comm=, not both: mesh= averages over its 'replicate'"
    ):
        localsgd.DataParallel(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            algorithms.LocalSGD(),
            mesh=object(),
            comm=SoloCommunicator(),
        )


def test_a_mesh_needs_a_replicate_dimension():
    mesh = SimpleNamespace(ndim=2, mesh_dim_names=("dp", "tp"))  # what the check reads of a DeviceMesh
    with pytest.raises(
        ValueError,
        match=r"^mesh must be a DeviceMesh with a 'replicate' dimension .*got dimensions \('dp', 'tp'\)$",
    ):
        replicate_communicator(mesh)


def test_sharded_parameters_is_a_declared_capability():
    assert algorithms.LocalSGD().capabilities.sharded_parameters
    assert algorithms.DiLoCo().capabilities.sharded_parameters
    assert not algorithms.GradientAccumulation().capabilities.sharded_parameters
    assert not algorithms.AsyncLocalSGD().capabilities.sharded_parameters
