"""``start_average`` / ``wait``: the non-blocking average lands the same bits as ``average``,
counted the same, on real gloo groups and in the simulated engine."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from harness import run_world
from localsgd.comm.base import WORLD, Block
from localsgd.comm.solo import SoloCommunicator
from localsgd.engines.simulated.communicator import SimulatedCommunicator

pytestmark = pytest.mark.timeout(300)


def _tensors(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    # Two dtypes (two collectives), one tensor not contiguous (packed and unpacked).
    return [
        torch.randn(5, 3, generator=g),
        torch.randn(4, 6, generator=g).t(),
        torch.randn(7, generator=g).to(torch.bfloat16),
    ]


def nonblocking(rank: int, world: int) -> dict[str, Any]:
    from localsgd.comm.process_group import ProcessGroupCommunicator

    blocking, started = ProcessGroupCommunicator(), ProcessGroupCommunicator()
    expected = _tensors(rank)
    blocking.average(expected, WORLD)
    got = _tensors(rank)
    handle = started.start_average(got, WORLD)
    counted_before_wait = started.stats.collectives
    # A blocking collective issued while the other is in flight keeps its own order.
    other = [torch.full((3,), float(rank))]
    started.average(other, WORLD, record=False)
    handle.wait()
    handle.wait()
    blocks = [torch.full((2,), float(rank))]
    started.prepare(Block(2))
    started.start_average(blocks, Block(2)).wait()
    return {
        "expected": expected,
        "got": got,
        "other": other[0],
        "blocks": blocks[0],
        "counted_before_wait": counted_before_wait,
        "blocking": blocking.stats.as_dict(),
        "started": started.stats.as_dict(),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_a_started_average_lands_the_bits_of_a_blocking_one_and_is_counted_alike(world):
    for rank, r in enumerate(run_world(nonblocking, world)):
        for a, b in zip(r["got"], r["expected"]):
            assert torch.equal(a, b)
        assert r["counted_before_wait"] == 0
        assert torch.equal(r["other"], torch.full((3,), (world - 1) / 2))
        block_mean = float(rank - rank % 2) + 0.5
        assert torch.equal(r["blocks"], torch.full((2,), block_mean))
        blocking, started = r["blocking"], r["started"]
        assert blocking["collectives"] == 2  # one per dtype
        assert started["by_scope"]["world"]["collectives"] == blocking["collectives"]
        assert started["by_scope"]["world"]["bytes"] == blocking["bytes"] == (15 + 24) * 4 + 7 * 4
        assert (started["by_scope"]["block2"]["collectives"], started["by_scope"]["block2"]["bytes"]) == (1, 8)


def test_the_simulated_average_becomes_visible_when_waited_on():
    k = 4
    comm, reference = SimulatedCommunicator(k), SimulatedCommunicator(k)
    stacked = torch.stack([torch.cat([t.reshape(-1).float() for t in _tensors(r)]) for r in range(k)])
    stacked64 = stacked.double()
    before = stacked.clone()
    handle = comm.start_average([stacked, stacked64], Block(2))
    assert torch.equal(stacked, before)
    assert comm.stats.collectives == 0
    handle.wait()
    expected = before.clone()
    reference.average([expected, before.double()], Block(2))
    assert torch.equal(stacked, expected)
    assert torch.equal(stacked[0], stacked[1]) and not torch.equal(stacked[1], stacked[2])
    assert comm.stats.as_dict()["by_scope"]["block2"]["bytes"] == reference.stats.by_scope["block2"]["bytes"]
    assert comm.stats.collectives == reference.stats.collectives == 2
    handle.wait()
    assert comm.stats.collectives == 2


def test_a_block_that_does_not_divide_the_world_is_refused_when_started():
    with pytest.raises(ValueError, match="block_size=3 does not divide the world size 4"):
        SimulatedCommunicator(4).start_average([torch.zeros(4, 2)], Block(3))


def test_one_process_has_nothing_in_flight():
    t = torch.ones(3)
    SoloCommunicator().start_average([t]).wait()
    assert torch.equal(t, torch.ones(3))
