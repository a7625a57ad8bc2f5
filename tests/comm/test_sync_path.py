"""The sync path's prepared state: spans found once and found again when a tensor moves,
scopes resolved once, and a re-homed parameter still averaged on real gloo ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import localsgd
from harness import run_world
from localsgd.comm.base import WORLD, Block
from localsgd.comm.flat import Spans, contiguous_span, flatten_into_views

pytestmark = pytest.mark.timeout(300)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_spans_are_kept_between_calls_and_found_again_when_a_tensor_moves():
    params = list(small_model().parameters())
    flatten_into_views(params)
    spans = Spans(params)
    first = spans.get()
    assert len(first) == 1 and first[0].numel() == sum(p.numel() for p in params)
    assert first[0].data_ptr() == params[0].data_ptr()
    assert spans.get() is first  # nothing moved: the same list, no new views

    moved = params[1]
    moved.data = moved.data.clone()  # re-homed: no longer inside the flat storage
    after = spans.get()
    assert after is not first and [t is p for t, p in zip(after, params)] == [True] * len(params)

    flatten_into_views(params)  # laid out back to back again, in a new storage
    again = spans.get()
    assert len(again) == 1 and again[0].data_ptr() == params[0].data_ptr() != first[0].data_ptr()
    expected = contiguous_span(params)
    assert expected is not None and torch.equal(again[0], expected)


def rehomed_sync(rank: int, world: int) -> dict[str, Any]:
    model = small_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(rank + 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with localsgd.DataParallel(model, opt, localsgd.algorithms.LocalSGD(period=1)) as dp:
        # Entering broadcast rank 0's model; give each rank its own values again.
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(rank + 1))
        opt.step()  # a sync on the flat span
        first = [p.detach().clone() for p in model.parameters()]
        if rank == 1:
            # Only this rank re-homes a parameter: it now sends packed tensors, the other
            # rank its span; both issue one collective of the same bytes.
            bias = model[0].bias
            bias.data = torch.full_like(bias, 10.0)
        with torch.no_grad():
            for p in model.parameters():
                if p is not model[0].bias or rank != 1:
                    p.fill_(float(rank + 1))
        opt.step()
        second = [p.detach().clone() for p in model.parameters()]
        stats = {k: v for k, v in dp.stats.items() if k != "by_scope"}
    return {"first": first, "second": second, "stats": stats, "numel": sum(p.numel() for p in first)}


def test_a_parameter_re_homed_on_one_rank_is_still_averaged():
    ranks = run_world(rehomed_sync, 2)
    mean = (1.0 + 2.0) / 2
    for r in ranks:
        assert all(torch.equal(t, torch.full_like(t, mean)) for t in r["first"])
        # model[0].bias is parameter 1: 1.0 on rank 0, 10.0 on rank 1.
        for i, t in enumerate(r["second"]):
            want = (1.0 + 10.0) / 2 if i == 1 else mean
            assert torch.equal(t, torch.full_like(t, want)), (i, t)
        assert r["stats"]["collectives"] == 2
        assert r["stats"]["bytes"] == 2 * 4 * r["numel"]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["second"], ranks[1]["second"]))


def scopes_resolved_once(rank: int, world: int) -> dict[str, Any]:
    from localsgd.comm.process_group import ProcessGroupCommunicator

    comm = ProcessGroupCommunicator()
    comm.prepare(Block(2))
    x = torch.full((5,), float(rank))
    comm.average([x], WORLD)
    after_world = x.clone()
    comm.average([x], WORLD)
    y = torch.full((5,), float(rank))
    comm.average([y], Block(2))  # an equal Block built anew finds the same route
    comm.average([y], Block(2))
    return {
        "routes": len(comm._routes),
        "x": after_world,
        "y": y,
        "by_scope": comm.stats.as_dict()["by_scope"],
    }


def test_scopes_are_resolved_once_and_average_within_their_blocks():
    ranks = run_world(scopes_resolved_once, 4)
    for rank, r in enumerate(ranks):
        assert r["routes"] == 2  # world and block2, however many calls
        assert torch.equal(r["x"], torch.full((5,), 1.5))
        block_mean = 0.5 if rank < 2 else 2.5
        assert torch.equal(r["y"], torch.full((5,), block_mean))
        assert r["by_scope"]["world"]["collectives"] == 2
        assert r["by_scope"]["block2"]["collectives"] == 2
        assert r["by_scope"]["block2"]["bytes"] == 2 * 4 * 5
