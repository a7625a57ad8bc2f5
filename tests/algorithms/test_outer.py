"""SlowMo and DiLoCo: the outer step against the papers' formulas."""

from __future__ import annotations

import torch

import localsgd
from localsgd import algorithms as A
from scenarios import batch, loss_step, make_model, train_plain


def test_slowmo_outer_step_matches_the_paper_formula_on_one_worker():
    lr, beta, alpha, period, steps = 0.05, 0.7, 1.5, 3, 9
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with localsgd.DataParallel(model, opt, A.SlowMo(period=period, outer_momentum=beta, outer_lr=alpha)):
        for step in range(steps):
            loss_step(model, opt, *batch(0, step))

    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr)
    x0 = [p.detach().clone() for p in ref.parameters()]
    u = [torch.zeros_like(p) for p in ref.parameters()]
    for step in range(steps):
        loss_step(ref, ref_opt, *batch(0, step))
        if (step + 1) % period == 0:
            with torch.no_grad():
                for p, a, m in zip(ref.parameters(), x0, u):
                    m.mul_(beta).add_((a - p) / lr)
                    a.sub_(alpha * lr * m)
                    p.copy_(a)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(next(model.parameters()), next(train_plain(steps, lr=lr).parameters())), (
        "slow momentum must change the trajectory"
    )


def test_diloco_outer_step_is_nesterov_sgd_on_the_pseudo_gradient():
    eta, mu, period, steps = 0.7, 0.9, 2, 6
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with localsgd.DataParallel(model, opt, A.DiLoCo(period=period, outer_lr=eta, outer_momentum=mu)):
        for step in range(steps):
            loss_step(model, opt, *batch(0, step))

    ref = make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    anchor = make_model()
    outer = torch.optim.SGD(anchor.parameters(), lr=eta, momentum=mu, nesterov=True)
    for step in range(steps):
        loss_step(ref, ref_opt, *batch(0, step))
        if (step + 1) % period == 0:
            with torch.no_grad():
                for a, p in zip(anchor.parameters(), ref.parameters()):
                    a.grad = a - p
            outer.step()
            with torch.no_grad():
                for a, p in zip(anchor.parameters(), ref.parameters()):
                    p.copy_(a)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_slowmo_leaves_the_model_alone_when_the_inner_rate_is_zero():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with localsgd.DataParallel(model, opt, A.SlowMo(period=1, outer_momentum=0.9)):
        for step in range(3):
            loss_step(model, opt, *batch(0, step))
        for group in opt.param_groups:
            group["lr"] = 0.0
        before = [p.detach().clone() for p in model.parameters()]
        loss_step(model, opt, *batch(0, 3))
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)
