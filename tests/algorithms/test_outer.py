"""SlowMo and DiLoCo: the outer step against the papers' formulas."""

from __future__ import annotations

import pytest
import torch

import localsgd
from fakes import run_fake
from localsgd import algorithms as A
from scenarios import batch, loss_step, make_model, train_plain


@torch.no_grad()
def slowmo_outer_step(
    model: torch.nn.Module,
    x0: list[torch.Tensor],
    u: list[torch.Tensor],
    lr: float,
    beta: float,
    alpha: float,
) -> None:
    """Wang et al.'s Algorithm 1: u ← βu + (x_0 - x)/γ, x_0 ← x_0 - αγu, x ← x_0."""
    for p, a, m in zip(model.parameters(), x0, u):
        m.mul_(beta).add_((a - p) / lr)
        a.sub_(alpha * lr * m)
        p.copy_(a)


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
            slowmo_outer_step(ref, x0, u, lr, beta, alpha)
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


def test_slowmo_after_a_switch_matches_the_paper_formula_from_the_switched_model():
    # One worker: t' plain SGD steps, then x_0 = the model at t', u = 0, and every H steps
    # counted from t' the outer step of Wang et al.'s Algorithm 1.
    lr, beta, alpha, period, switch, steps = 0.05, 0.7, 1.5, 3, 4, 11
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    algo = A.SlowMo(period=period, outer_momentum=beta, outer_lr=alpha, switch_step=switch)
    with localsgd.DataParallel(model, opt, algo) as dp:
        for step in range(steps):
            loss_step(model, opt, *batch(0, step))
    stats = dp.stats

    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    x0: list[torch.Tensor] = []
    u: list[torch.Tensor] = []
    for step in range(steps):
        loss_step(ref, ref_opt, *batch(0, step))
        if step + 1 == switch:
            x0 = [p.detach().clone() for p in ref.parameters()]
            u = [torch.zeros_like(p) for p in ref.parameters()]
        elif (step + 1 > switch and (step + 1 - switch) % period == 0) or step + 1 == steps:
            slowmo_outer_step(ref, x0, u, lr, beta, alpha)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # 4 gradient rounds, outer steps after local steps 3 and 6, and the one on exit (7 steps).
    assert stats["syncs"] == switch + 3
    # Anchored at the initial model instead, the same run ends elsewhere.
    plain = make_model()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9)
    with localsgd.DataParallel(
        plain, plain_opt, A.SlowMo(period=period, outer_momentum=beta, outer_lr=alpha)
    ):
        for step in range(steps):
            loss_step(plain, plain_opt, *batch(0, step))
    assert not torch.allclose(next(model.parameters()), next(plain.parameters()))


@pytest.mark.parametrize(
    "algo",
    [
        A.SlowMo(period=4, outer_momentum=0.5, switch_step=5),
        A.DiLoCo(period=4, switch_step=5),
        A.PostLocalSGD(period=4, switch_step=5),
    ],
    ids=["slowmo", "diloco", "post_local_sgd"],
)
def test_after_a_switch_the_outer_optimizers_communicate_as_post_local_sgd(algo):
    per_step, stats, *_ = run_fake(algo, 14)
    assert per_step[:5] == [["world"]] * 5  # gradients, every step
    assert per_step[5:] == [[], [], [], ["world"], [], [], [], ["world"], []]
    assert stats["syncs"] == 7


def test_a_switch_at_zero_is_the_algorithm_without_a_switch():
    assert A.SlowMo(period=4).switch_step == 0 and A.DiLoCo(period=4).switch_step == 0
    for algo in (A.SlowMo(period=4), A.DiLoCo(period=4)):
        per_step, stats, *_ = run_fake(algo, 9)
        assert per_step == [[], [], [], ["world"], [], [], [], ["world"], []]
        assert stats["syncs"] == 2
    with pytest.raises(ValueError, match=r"slowmo\.switch_step"):
        A.SlowMo(switch_step=-1)
    with pytest.raises(ValueError, match=r"diloco\.switch_step"):
        A.DiLoCo(switch_step=1.5)  # type: ignore[arg-type]


def test_a_switched_run_refuses_the_state_of_a_run_without_a_switch():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with localsgd.DataParallel(model, opt, A.SlowMo(period=2)) as plain:
        unswitched = plain.state_dict()
    with localsgd.DataParallel(model, opt, A.SlowMo(period=2, switch_step=3)) as dp:
        with pytest.raises(ValueError, match=r"slowmo state is missing \['step', 'minibatch', 'local'\]"):
            dp.load_state_dict(unswitched)
