"""Gradient accumulation: the model moves only on applied updates."""

from __future__ import annotations

import torch

import localsgd
from fakes import FakeCommunicator
from localsgd import algorithms as A
from scenarios import batch, loss_step, make_model


def test_gradient_accumulation_leaves_the_model_alone_between_updates():
    comm = FakeCommunicator(world_size=2)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    with localsgd.DataParallel(model, opt, A.GradientAccumulation(steps=3), comm=comm):
        for step in range(7):
            before = [p.detach().clone() for p in model.parameters()]
            loss_step(model, opt, *batch(0, step))
            moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
            assert moved == ((step + 1) % 3 == 0), step
            if step < 2:
                assert len(opt.state) == 0  # no momentum buffer either
    assert [c.op for c in comm.calls].count("average") == 2
