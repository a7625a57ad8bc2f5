"""DataParallel around a DistributedDataParallel model (what ``accelerator.prepare`` returns
with several processes): local steps do not all-reduce, mini-batch SGD lets DDP do its
averaging once, and both train exactly as the same algorithm on the plain model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import localsgd
from harness import run_world
from localsgd import algorithms as A
from scenarios import batch, flat, loss_step, make_model

# One xdist worker runs this module, so its world of two ranks is built once per session, not once per worker.
pytestmark = pytest.mark.xdist_group("ddp_worlds")

STEPS = 7


def _train(rank: int, world: int, algo: A.AlgorithmConfig, ddp: bool) -> dict[str, Any]:
    model = make_model()
    wrapped: torch.nn.Module = DistributedDataParallel(model) if ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    differ_after_first = None
    with localsgd.DataParallel(wrapped, opt, algo) as dp:
        for step in range(STEPS):
            loss_step(wrapped, opt, *batch(rank, step))
            if step == 0:
                mine = flat(model)
                everyone = [torch.zeros_like(mine) for _ in range(world)]
                dist.all_gather(everyone, mine)
                differ_after_first = not torch.equal(everyone[0], everyone[1])
    return {
        "params": flat(model),
        "stats": dp.stats,
        "differ_after_first": differ_after_first,
        "grad_sync_restored": wrapped.require_backward_grad_sync if ddp else None,
    }


ALGORITHMS = {"local_sgd": A.LocalSGD(period=3), "minibatch_sgd": A.MiniBatchSGD()}


def _compare(rank: int, world: int) -> dict[str, Any]:
    return {
        name: {"ddp": _train(rank, world, algo, ddp=True), "plain": _train(rank, world, algo, ddp=False)}
        for name, algo in ALGORITHMS.items()
    }


@pytest.fixture(scope="module")
def worlds() -> list[dict[str, Any]]:
    """One world of two ranks trains every case (starting ranks costs more than training)."""
    return run_world(_compare, 2)


def test_local_sgd_on_a_ddp_model_skips_ddp_and_equals_the_plain_model(worlds):
    results = [w["local_sgd"] for w in worlds]
    for r in results:
        ddp, plain = r["ddp"], r["plain"]
        assert torch.equal(ddp["params"], plain["params"])
        assert ddp["differ_after_first"] and plain["differ_after_first"]  # no all-reduce in local steps
        assert ddp["grad_sync_restored"] is True
        assert ddp["stats"]["syncs"] == plain["stats"]["syncs"] == 3  # steps 3, 6 and the exit
    assert torch.equal(results[0]["ddp"]["params"], results[1]["ddp"]["params"])


def test_minibatch_sgd_on_a_ddp_model_lets_ddp_average_once(worlds):
    results = [w["minibatch_sgd"] for w in worlds]
    n_params = sum(p.numel() for p in make_model().parameters())
    for r in results:
        ddp, plain = r["ddp"], r["plain"]
        # DDP divides each gradient by the world size before summing; for two workers that
        # is exact, so the updates agree to the bit.
        assert torch.equal(ddp["params"], plain["params"])
        assert not ddp["differ_after_first"]
        assert ddp["stats"]["syncs"] == STEPS
        assert ddp["stats"]["bytes"] == plain["stats"]["bytes"] == STEPS * 4 * n_params
        assert ddp["stats"]["collectives"] >= STEPS  # one per DDP bucket per step
        assert ddp["stats"]["comm_seconds"] == 0.0  # overlapped with backward, not measured
