"""Local SGD: when it syncs (fake communicator), what it averages."""

from __future__ import annotations

import pytest
import torch

import localsgd
from fakes import FakeCommunicator, run_fake
from localsgd import algorithms as A
from scenarios import batch, loss_step, make_model


def test_local_sgd_syncs_every_period_and_once_more_on_exit():
    per_step, stats, comm, *_ = run_fake(A.LocalSGD(period=3), 10)
    assert per_step == [["world"] if (i + 1) % 3 == 0 else [] for i in range(10)]
    assert stats["syncs"] == 3 and stats["steps"] == 10
    # The tenth step was local: exit averages once more to leave the consensus model.
    assert [c.op for c in comm.calls].count("average") == 4


def test_exit_right_after_a_sync_communicates_nothing_more():
    _, _, comm, *_ = run_fake(A.LocalSGD(period=5, average_buffers=True), 10)
    assert [c.op for c in comm.calls].count("average") == 2


def test_optimizer_state_average_and_reset():
    _, _, comm, model, _ = run_fake(A.LocalSGD(period=2, optimizer_state="average"), 2)
    n_params = sum(p.numel() for p in model.parameters())
    averages = [c for c in comm.calls if c.op == "average"]
    assert averages[0].numel == 2 * n_params  # parameters + momentum buffers, one call

    comm = FakeCommunicator(world_size=2)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with localsgd.DataParallel(model, opt, A.LocalSGD(period=2, optimizer_state="reset"), comm=comm):
        loss_step(model, opt, *batch(0, 0))
        assert len(opt.state) == len(list(model.parameters()))
        loss_step(model, opt, *batch(0, 1))
        assert len(opt.state) == 0


def test_averaging_optimizer_state_refuses_partial_state():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"optimizer_state='average' needs optimizer state for every"):
        with localsgd.DataParallel(
            model, opt, A.LocalSGD(period=1, optimizer_state="average"), comm=FakeCommunicator(2)
        ):
            opt.zero_grad()
            out = model[0](batch(0, 0)[0]).sum()  # only the first layer gets a gradient
            out.backward()
            for p in list(model.parameters())[2:]:
                p.grad = None
            opt.step()
