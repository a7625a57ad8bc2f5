"""Hierarchical local SGD: block and world schedules."""

from __future__ import annotations

import pytest
import torch

import localsgd
from fakes import FakeCommunicator, run_fake
from localsgd import algorithms as A
from scenarios import make_model


def test_block_size_must_divide_the_world():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = localsgd.DataParallel(
        model, opt, A.HierarchicalLocalSGD(block_size=3), comm=FakeCommunicator(world_size=4)
    )
    with pytest.raises(
        ValueError, match=r"block_size=3 does not divide the world size 4; allowed: one of \[1, 2, 4\]"
    ):
        dp.__enter__()


def test_hierarchical_schedule_blocks_then_world():
    per_step, stats, *_ = run_fake(A.HierarchicalLocalSGD(period=2, block_period=3, block_size=2), 12)
    want = [[] for _ in range(12)]
    for s in (2, 4, 8, 10):
        want[s - 1] = ["block2"]
    for s in (6, 12):
        want[s - 1] = ["world"]
    assert per_step == want
    assert stats["by_scope"]["block2"]["collectives"] == 4
    assert stats["by_scope"]["world"]["collectives"] == 2
