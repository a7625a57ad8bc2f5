"""DataParallel: flat layout, bad input, exceptions, consensus, a world of one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import localsgd
from fakes import FakeCommunicator
from localsgd import algorithms as A
from scenarios import batch, loss_step, make_model, train_plain


def test_world_of_one_is_plain_training():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with localsgd.DataParallel(model, opt, A.LocalSGD(period=3)) as dp:
        for step in range(7):
            loss_step(model, opt, *batch(0, step))
    ref = train_plain(7, lr=0.1, momentum=0.9)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert dp.world_size == 1 and dp.stats["collectives"] == 0 and dp.stats["bytes"] == 0


def test_parameters_become_views_of_one_flat_buffer_per_dtype():
    model = make_model(extra_f64=True)
    values = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with localsgd.DataParallel(model, opt, A.LocalSGD(period=2), comm=FakeCommunicator(2)):
        from localsgd.comm.flat import contiguous_span

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in model.parameters():
            by_dtype.setdefault(p.dtype, []).append(p)
        assert set(by_dtype) == {torch.float32, torch.float64}
        for group in by_dtype.values():
            span = contiguous_span(group)
            assert span is not None and span.numel() == sum(p.numel() for p in group)
        for p, v in zip(model.parameters(), values):
            assert torch.equal(p, v)
        loss_step(model, opt, *batch(0, 0))
        assert not torch.equal(next(model.parameters()), values[0])


def test_data_parallel_rejects_bad_input():
    model = make_model()
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="optimizer holds a parameter of shape"):
        opt = torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1)
        localsgd.DataParallel(model, opt, A.LocalSGD()).__enter__()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"model must be a torch\.nn\.Module"):
        localsgd.DataParallel(object(), opt, A.LocalSGD())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown key 'local_sgd\.perod'"):
        localsgd.DataParallel(model, opt, {"name": "local_sgd", "perod": 1})
    dp = localsgd.DataParallel(model, opt, A.LocalSGD())
    with pytest.raises(RuntimeError, match="inside the with block"):
        dp.load_state_dict({})
    with dp:
        state = dp.state_dict()
    with localsgd.DataParallel(model, opt, A.SMA()) as other_dp:
        with pytest.raises(ValueError, match=r"saved by algorithm 'local_sgd'.*runs 'sma'"):
            other_dp.load_state_dict(state)


def test_exception_in_the_block_propagates_and_removes_hooks():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    comm = FakeCommunicator(2)
    with pytest.raises(KeyError, match="boom"):
        with localsgd.DataParallel(model, opt, A.MiniBatchSGD(), comm=comm):
            raise KeyError("boom")
    n = len(comm.calls)
    loss_step(model, opt, *batch(0, 0))
    assert len(comm.calls) == n  # no hook left behind, no collective attempted on exit


class ShiftingCommunicator(FakeCommunicator):
    """A fake whose 'average' moves every value, so a restore has something to undo."""

    def average(self, tensors, scope=None, *, record=True):  # type: ignore[override]
        super().average(tensors, scope or localsgd.comm.WORLD, record=record)
        with torch.no_grad():
            for t in tensors:
                t.add_(1.0)


def test_consensus_restores_the_replica_and_is_not_counted():
    comm = ShiftingCommunicator(2)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with localsgd.DataParallel(model, opt, A.LocalSGD(period=4), comm=comm) as dp:
        loss_step(model, opt, *batch(0, 0))
        before = [p.detach().clone() for p in model.parameters()]
        stats = dict(dp.stats)
        with dp.consensus() as m:
            assert m is model
            assert not torch.equal(next(model.parameters()), before[0])  # the consensus was in place
        assert dp.stats["collectives"] == stats["collectives"]
        assert comm.calls[-1].op == "average"
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_average_in_a_world_of_one():
    model = make_model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with localsgd.DataParallel(model, opt, A.LocalSGD(period=2)):
        x, y = batch(0, 0)
        loss_step(model, opt, x.cuda(), y.cuda())
    assert next(model.parameters()).is_cuda


@pytest.mark.parametrize(
    "algo",
    [A.SlowMo(period=4, outer_momentum=0.5), A.DiLoCo(period=4), A.LocalSGD(period=4), A.SMA(alpha=0.5)],
    ids=lambda a: a.name,
)
def test_consensus_is_what_exit_leaves_and_changes_nothing(algo):
    def run(peek: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        seen: list[torch.Tensor] = []
        with localsgd.DataParallel(model, opt, algo) as dp:
            for step in range(6):
                loss_step(model, opt, *batch(0, step))
                if peek:
                    with dp.consensus():
                        seen = [p.detach().clone() for p in model.parameters()]
        return seen, [p.detach().clone() for p in model.parameters()]

    seen, final = run(peek=True)
    _, undisturbed = run(peek=False)
    for a, b, c in zip(seen, final, undisturbed):
        assert torch.equal(a, b)  # evaluated model == the model left on exit
        assert torch.equal(b, c)  # peeking did not change the trajectory
