"""The Lightning strategy under ``torchrun`` (2 CPU processes, gloo): mini-batch SGD through
it trains as Lightning's own DDP does, local SGD as ``DataParallel`` in a bare loop on the
same per-rank data, bit for bit; H counts optimizer updates under gradient accumulation;
validation and checkpoints see the consensus model; a resumed run ends as the uninterrupted
one; under fp16 a step one rank's overflow skips is skipped on both and still counts. And ``examples/lightning.py`` trains under ``torchrun`` (in the same launch).

Bitwise equality is the right bar: each pair runs the same float operations in the same
order on the same data (DDP's all-reduce of one bucket, or no communication between syncs,
and the same flat all-reduce at a sync).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from harness import finished, launch

# Looked up, not imported: only the launched processes need Lightning (seconds to import).
if importlib.util.find_spec("lightning") is None or importlib.util.find_spec("pytorch_lightning") is None:
    pytest.skip("lightning and pytorch_lightning are not installed", allow_module_level=True)

# One worker runs the module, so that the launch behind its module fixture runs once per session.
pytestmark = pytest.mark.xdist_group("lightning")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMEOUT = 400  # seconds; a launch takes ~35 s on 2 busy cores
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# Updates per epoch in the parity script: 48 samples, 24 a rank, batches of 4.
EPOCH = 6
EXAMPLE = {"--period": 4, "--epochs": 2, "--samples": 512, "--batch-size": 32}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("lightning")
    example = [str(a) for kv in EXAMPLE.items() for a in kv]
    proc = launch([*TORCHRUN, str(HERE / "lightning_parity.py"), str(out), *example], TIMEOUT)
    # Each rank writes its file (by rename, so it is complete) before ending.
    files = [out / f"rank{r}.pt" for r in range(2)]
    assert finished(proc, files), proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [torch.load(f) for f in files]
    results[0].update(dir=out, stdout=proc.stdout)
    return results


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_minibatch_sgd_through_the_strategy_equals_lightnings_ddp(ranks):
    for r in ranks:
        assert r["world_size"] == 2
        ours, theirs = r["minibatch"], r["ddp"]
        assert len(ours["trace"]) == 2 * EPOCH and same(ours["trace"], theirs["trace"])
        assert torch.equal(ours["final"], theirs["final"])
        # DDP averaged the gradients (its sync left on); one bucket counted per update.
        assert all(ours["grad_sync"])
        assert ours["stats"]["steps"] == ours["stats"]["syncs"] == ours["stats"]["collectives"] == 2 * EPOCH
        assert ours["stats"]["comm_seconds"] == 0.0
    assert torch.equal(ranks[0]["minibatch"]["final"], ranks[1]["minibatch"]["final"])


def test_local_sgd_through_the_strategy_equals_data_parallel_in_a_bare_loop(ranks):
    for r in ranks:
        ours, bare = r["local"], r["local_bare"]
        assert same(ours["trace"], bare["trace"]) and torch.equal(ours["final"], bare["final"])
        assert not any(ours["grad_sync"])  # backward passes ran without DDP's all-reduce
        # 12 updates, H = 4: three syncs, one flat all-reduce each; fit ends on a sync.
        assert ours["global_step"] == ours["stats"]["steps"] == 12
        assert ours["stats"]["syncs"] == ours["stats"]["collectives"] == 3
        n = ours["final"].numel()
        assert ours["stats"]["bytes"] == 3 * 4 * n
    a, b = ranks[0]["local"]["trace"], ranks[1]["local"]["trace"]
    assert [torch.equal(x, y) for x, y in zip(a, b)] == [(i + 1) % 4 == 0 for i in range(12)]
    assert torch.equal(ranks[0]["local"]["final"], ranks[1]["local"]["final"])


def test_manual_optimization_trains_the_same(ranks):
    # Lightning turns DDP's sync back on after each manual-optimization forward pass; the
    # strategy turns it off again, or the next manual_backward would average the gradients.
    for r in ranks:
        assert same(r["manual"]["trace"], r["local_bare"]["trace"])
        assert r["manual"]["stats"]["syncs"] == 3 and not any(r["manual"]["grad_sync"])


def test_fp16_skipped_step_counts_and_matches_the_bare_loop(ranks):
    # Rank 1's loss overflowed at update 4, where a sync is due: both ranks skipped it (the
    # scale halved once, on both), it counted, and the sync happened at it.
    for r in ranks:
        ours = r["fp16"]
        assert ours["scales"] == [256.0] * 3 + [128.0] * 9
        assert ours["global_step"] == ours["stats"]["steps"] == 12 and ours["stats"]["syncs"] == 3
        for reference in (r["fp16_stepped"], r["fp16_handed"]):
            assert same(ours["trace"], reference["trace"]) and torch.equal(ours["final"], reference["final"])
            assert reference["scales"] == ours["scales"] and reference["stats"]["syncs"] == 3
    a, b = ranks[0]["fp16"]["trace"], ranks[1]["fp16"]["trace"]
    # Replicas agree after the same updates as in the fp32 run, and only then.
    fp32 = [torch.equal(x, y) for x, y in zip(ranks[0]["local"]["trace"], ranks[1]["local"]["trace"])]
    assert [torch.equal(x, y) for x, y in zip(a, b)] == fp32
    # No update at the skipped step: the sync averaged the replicas of update 3.
    assert torch.equal(a[3], (a[2] + b[2]) / 2) and torch.isfinite(a[-1]).all()


def test_fp16_with_a_fused_optimizer_skips_on_every_rank(ranks):
    # A fused optimizer unscales inside its step, where Lightning never calls unscale_: the
    # strategy unscales first so that rank 0 skips the update with rank 1.
    for r in ranks:
        ours = r["fp16_fused"]
        assert ours["scales"] == r["fp16"]["scales"] and ours["stats"]["syncs"] == 3
        assert same(ours["trace"], r["fp16_fused_bare"]["trace"])
    a, b = ranks[0]["fp16_fused"]["trace"], ranks[1]["fp16_fused"]["trace"]
    assert torch.equal(a[3], (a[2] + b[2]) / 2) and torch.equal(a[-1], b[-1])


def test_validation_during_fit_sees_the_consensus_model(ranks):
    for r in ranks:
        # After each epoch (6 updates, mid-period): the average the bare loop's consensus()
        # gave, on both ranks; training went on from each rank's own replica (test above).
        assert same(r["local"]["validated"], r["local_bare"]["consensus"])
        assert not torch.equal(r["local_bare"]["consensus"][0], r["local_bare"]["trace"][EPOCH - 1])


def test_accumulate_grad_batches_counts_optimizer_updates(ranks):
    for r in ranks:
        ours = r["accumulate"]
        # 12 micro-batches, 6 updates: a sync after the 4th update and one on leaving.
        assert ours["global_step"] == ours["stats"]["steps"] == 6 and ours["stats"]["syncs"] == 2
        assert same(ours["trace"], r["accumulate_bare"]["trace"])
        # Lightning's no_sync() around the accumulating micro-batches restored the sync to
        # off; it never turned DDP's all-reduce back on.
        assert len(ours["grad_sync"]) == 12 and not any(ours["grad_sync"])


def test_an_algorithm_that_reads_gradients_before_the_step_sees_this_steps(ranks):
    # gradient_accumulation averages the gradients in its step pre-hook: Lightning's closure
    # (forward, backward) must have run by then.
    for r in ranks:
        ours, bare = r["grad_accumulation_algorithm"], r["grad_accumulation_algorithm_bare"]
        assert same(ours["trace"], bare["trace"]) and ours["stats"]["syncs"] == 3


def test_checkpoint_holds_the_consensus_and_resume_is_exact(ranks):
    ckpt_dir = ranks[0]["dir"] / "ckpt"
    checkpoint = torch.load(ckpt_dir / "epoch=0.ckpt", weights_only=False)
    weights = torch.cat([t.reshape(-1) for t in checkpoint["state_dict"].values()])
    # Saved in on_validation_end, with the consensus in place for validation.
    assert torch.equal(weights, ranks[0]["local_bare"]["consensus"][0])
    for rank, r in enumerate(ranks):
        side = torch.load(ckpt_dir / f"epoch=0.ckpt.localsgd-rank{rank}.pt")
        assert side["rank"] == rank and side["world_size"] == 2
        replica = torch.cat([t.reshape(-1) for t in side["data_parallel"]["replica"].values()])
        assert torch.equal(replica, r["local_bare"]["trace"][EPOCH - 1])  # this rank's own
        resumed = r["resumed"]
        assert same(resumed["trace"], r["local"]["trace"][EPOCH:])
        assert torch.equal(resumed["final"], r["local"]["final"])
        assert resumed["stats"]["steps"] == 12 and resumed["stats"]["syncs"] == 3
        # Without the per-rank files the replicas restart from the consensus: a warning,
        # and a different run.
        alone = r["resumed_without_state"]
        assert not torch.equal(alone["final"], r["local"]["final"])
        assert len(alone["warnings"]) == (1 if rank == 0 else 0)
        if rank == 0:
            assert re.search(r"localsgd-rank0\.pt is missing: the replicas resume", alone["warnings"][0])


def test_algorithm_state_resumes_exactly(ranks):
    # DiLoCo's outer momentum and anchor model come back from the per-rank files too.
    for r in ranks:
        assert same(r["diloco_resumed"]["trace"], r["diloco"]["trace"][EPOCH:])
        assert torch.equal(r["diloco_resumed"]["final"], r["diloco"]["final"])
        assert not torch.equal(r["diloco"]["final"], r["local"]["final"])


def test_asynchronous_algorithm_runs_and_ends_on_the_servers_model(ranks):
    for r in ranks:
        stats = r["async"]["stats"]
        # 12 updates, a push every 4th; the server's model is pulled for validation too.
        assert stats["steps"] == 12 and stats["by_scope"]["push"]["collectives"] == 3
        assert len(r["async"]["validated"]) == 2
    assert torch.equal(ranks[0]["async"]["final"], ranks[1]["async"]["final"])


def test_pytorch_lightning_namespace_trains_the_same(ranks):
    for r in ranks:
        assert same(r["pytorch_lightning"]["trace"], r["local_bare"]["trace"][:EPOCH])


def test_strategy_refuses_model_averaging_period_and_bad_algorithms(ranks):
    averaging, period = ranks[0]["refusals"]
    assert "pass algorithm={'name': 'local_sgd', 'period': H} instead of model_averaging_period" in averaging
    assert re.search(r"local_sgd\.period must be an integer >= 1", period)


def test_example_trains_under_torchrun(ranks):
    args = EXAMPLE
    out = ranks[0]["stdout"]
    stats = re.search(r"^stats=(\{.*\})$", out, re.M)
    accuracy = re.search(r"^val_accuracy=([0-9.]+)$", out, re.M)
    assert stats and accuracy, out[-3000:]
    counted = json.loads(stats.group(1))
    per_rank = math.ceil(args["--samples"] * 4 // 5 / 2)  # DistributedSampler pads to equal shares
    steps = args["--epochs"] * math.ceil(per_rank / args["--batch-size"])
    period = args["--period"]
    assert counted["steps"] == steps and counted["syncs"] == steps // period + (steps % period > 0)
    assert float(accuracy.group(1)) > 0.45  # the most common class is 39% of the validation set
    for rank in range(2):
        assert (ranks[0]["dir"] / "example" / f"epoch=1-step={steps}.ckpt.localsgd-rank{rank}.pt").exists()
