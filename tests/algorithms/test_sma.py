"""SMA: Crossbow's update rule."""

from __future__ import annotations

import torch
from torch import nn

import localsgd
from localsgd import algorithms as A
from scenarios import batch, loss_step, make_model


def test_sma_follows_crossbow_update_rule():
    """Two learners simulated by hand against SMA's formulas, with K=2 faked by a
    communicator that averages with a fixed partner replica."""
    gamma, alpha, mu, steps = 0.1, 0.3, 0.5, 5

    class Pair:
        """Rank 0 of a world of 2 whose partner's tensors are supplied per call."""

        world_size, rank = 2, 0

        def __init__(self) -> None:
            self.partner: list[torch.Tensor] = []
            from localsgd.comm.base import CommStats

            self.stats = CommStats()

        def prepare(self, scope) -> None: ...

        def broadcast(self, tensors, src=0, *, record=True) -> None: ...

        def average(self, tensors, scope=None, *, record=True) -> None:
            for t, o in zip(tensors, self.partner):
                t.add_(o).mul_(0.5)

    def grad_of(model: nn.Module, step: int, rank: int) -> list[torch.Tensor]:
        model.zero_grad()
        nn.functional.cross_entropy(model(batch(rank, step)[0]), batch(rank, step)[1]).backward()
        return [p.grad.detach().clone() for p in model.parameters()]

    # Reference: both learners by hand.
    w = [make_model(), make_model()]
    z = [p.detach().clone() for p in w[0].parameters()]
    z_prev = [t.clone() for t in z]
    partner_d: list[list[torch.Tensor]] = []
    for step in range(steps):
        grads = [grad_of(w[j], step, j) for j in range(2)]
        c = [[alpha * (p.detach() - zz) for p, zz in zip(w[j].parameters(), z)] for j in range(2)]
        partner_d.append([(p.detach() - zz).clone() for p, zz in zip(w[1].parameters(), z)])
        with torch.no_grad():
            for j in range(2):
                for p, g, cj in zip(w[j].parameters(), grads[j], c[j]):
                    p.sub_(gamma * g + cj)
            new_z = [zz + c[0][i] + c[1][i] + mu * (zz - zp) for i, (zz, zp) in enumerate(zip(z, z_prev))]
            z_prev, z = z, new_z

    # Library: learner 0, with learner 1's w_1 - z supplied to the fake average.
    comm = Pair()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=gamma)
    with localsgd.DataParallel(model, opt, A.SMA(alpha=alpha, momentum=mu), comm=comm) as dp:
        for step in range(steps):
            comm.partner = partner_d[step]
            loss_step(model, opt, *batch(0, step))
        central = [t.clone() for t in dp._sync.central]  # type: ignore[union-attr]
        for p, q in zip(model.parameters(), w[0].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for a, b in zip(central, z):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # On exit the consensus model is z.
    for p, b in zip(model.parameters(), z):
        torch.testing.assert_close(p.detach(), b, rtol=1e-5, atol=1e-6)
