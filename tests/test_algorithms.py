"""Configs, registry and control flow (with a fake communicator), and single-replica math."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import pytest
import torch
from torch import nn

import localsgd
from fakes import FakeCommunicator
from localsgd import algorithms as A
from scenarios import batch, loss_step, make_model

# -- validation ------------------------------------------------------------------------------

INVALID = [
    (A.LocalSGD, {"period": 0}, "local_sgd.period"),
    (A.LocalSGD, {"period": 2.5}, "local_sgd.period"),
    (A.LocalSGD, {"optimizer_state": "keep"}, "local_sgd.optimizer_state"),
    (A.LocalSGD, {"average_buffers": 1}, "local_sgd.average_buffers"),
    (A.PostLocalSGD, {"switch_step": -1}, "post_local_sgd.switch_step"),
    (A.PostLocalSGD, {"period": 0}, "post_local_sgd.period"),
    (A.HierarchicalLocalSGD, {"block_size": 0}, "hierarchical_local_sgd.block_size"),
    (A.HierarchicalLocalSGD, {"block_period": 0}, "hierarchical_local_sgd.block_period"),
    (A.HierarchicalLocalSGD, {"period": -3}, "hierarchical_local_sgd.period"),
    (A.SlowMo, {"momentum": 1.0}, "slowmo.momentum"),
    (A.SlowMo, {"momentum": -0.1}, "slowmo.momentum"),
    (A.SlowMo, {"lr": 0.0}, "slowmo.lr"),
    (A.SlowMo, {"period": 0}, "slowmo.period"),
    (A.DiLoCo, {"outer_lr": -1.0}, "diloco.outer_lr"),
    (A.DiLoCo, {"outer_momentum": 1.5}, "diloco.outer_momentum"),
    (A.DiLoCo, {"outer_momentum": float("nan")}, "diloco.outer_momentum"),
    (A.SMA, {"alpha": 0.0}, "sma.alpha"),
    (A.SMA, {"alpha": 1.5}, "sma.alpha"),
    (A.SMA, {"momentum": 1.0}, "sma.momentum"),
    (A.GradientAccumulation, {"steps": 0}, "gradient_accumulation.steps"),
]


@pytest.mark.parametrize("cls,kwargs,field", INVALID, ids=[f"{c.__name__}-{f}" for c, _, f in INVALID])
def test_invalid_hyperparameters_raise_naming_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cls(**kwargs)


def test_every_field_is_documented_and_every_config_round_trips():
    import ast
    import inspect

    assert A.names() == sorted(
        [
            "minibatch_sgd",
            "gradient_accumulation",
            "local_sgd",
            "post_local_sgd",
            "hierarchical_local_sgd",
            "slowmo",
            "diloco",
            "sma",
        ]
    )
    for name in A.names():
        cls = A.get(name)
        config = cls()
        assert A.build(config.to_dict()) == config
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        # Each field is followed by its docstring in the class body.
        body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
        documented = {
            stmt.target.id
            for stmt, nxt in itertools.pairwise(body)
            if isinstance(stmt, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        }
        assert {f.name for f in dataclasses.fields(cls)} <= documented, name


def test_build_from_plain_dicts():
    assert A.build({"name": "local_sgd", "period": 8}) == A.LocalSGD(period=8)
    assert A.build({"name": "slowmo", "lr": 2}) == A.SlowMo(lr=2.0)
    assert A.build({"name": "sma", "alpha": None}) == A.SMA()
    with pytest.raises(ValueError, match=r"'local_sgd' has no field 'perod'.*allowed: \['average_buffers'"):
        A.build({"name": "local_sgd", "perod": 8})
    with pytest.raises(ValueError, match=r"local_sgd\.period must be int, got str '8'"):
        A.build({"name": "local_sgd", "period": "8"})
    with pytest.raises(ValueError, match=r"local_sgd\.average_buffers must be bool"):
        A.build({"name": "local_sgd", "average_buffers": "yes"})
    with pytest.raises(ValueError, match=r"algorithm name 'localsgd' is unknown; allowed: \['diloco'"):
        A.build({"name": "localsgd"})
    with pytest.raises(ValueError, match="needs a 'name' key"):
        A.build({"period": 8})
    with pytest.raises(ValueError, match="must be a mapping"):
        A.build("local_sgd")  # type: ignore[arg-type]


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


# -- control flow with the fake communicator ---------------------------------------------------


def run_fake(algo: A.AlgorithmConfig, steps: int, world: int = 4, momentum: float = 0.9):
    comm = FakeCommunicator(world_size=world)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    per_step = []
    with localsgd.DataParallel(model, opt, algo, comm=comm) as dp:
        assert [c.op for c in comm.calls] == ["broadcast"]
        for step in range(steps):
            n = len(comm.calls)
            loss_step(model, opt, *batch(0, step))
            per_step.append([c.scope for c in comm.calls[n:]])
        stats = dp.stats
    return per_step, stats, comm, model, opt


def test_local_sgd_syncs_every_period_and_once_more_on_exit():
    per_step, stats, comm, *_ = run_fake(A.LocalSGD(period=3), 10)
    assert per_step == [["world"] if (i + 1) % 3 == 0 else [] for i in range(10)]
    assert stats["syncs"] == 3 and stats["steps"] == 10
    # The tenth step was local: exit averages once more to leave the consensus model.
    assert [c.op for c in comm.calls].count("average") == 4


def test_exit_right_after_a_sync_communicates_nothing_more():
    _, _, comm, *_ = run_fake(A.LocalSGD(period=5, average_buffers=True), 10)
    assert [c.op for c in comm.calls].count("average") == 2


def test_post_local_counts_its_period_from_the_switch():
    per_step, stats, *_ = run_fake(A.PostLocalSGD(switch_step=5, period=4), 14)
    assert per_step[:5] == [["world"]] * 5  # gradients, every step
    assert per_step[5:] == [[], [], [], ["world"], [], [], [], ["world"], []]
    assert stats["syncs"] == 7


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


# -- a world of one, single-replica algorithm math ----------------------------------------------


def train_plain(steps: int, **opt_kwargs) -> nn.Module:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), **opt_kwargs)
    for step in range(steps):
        loss_step(model, opt, *batch(0, step))
    return model


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


def test_slowmo_outer_step_matches_the_paper_formula_on_one_worker():
    lr, beta, alpha, period, steps = 0.05, 0.7, 1.5, 3, 9
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with localsgd.DataParallel(model, opt, A.SlowMo(period=period, momentum=beta, lr=alpha)):
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


# -- DataParallel --------------------------------------------------------------------------------


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
    with pytest.raises(ValueError, match="has no field 'perod'"):
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


# -- process-group set-up -----------------------------------------------------------------------


def test_init_distributed_without_torchrun_is_a_world_of_one(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info = localsgd.init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"incomplete torch.distributed environment"):
        localsgd.init_distributed()
    with pytest.raises(ValueError, match="backend must be 'gloo', 'nccl' or None"):
        localsgd.init_distributed(backend="mpi")


def test_import_is_light():
    code = "import sys, localsgd; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


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
    [A.SlowMo(period=4, momentum=0.5), A.DiLoCo(period=4), A.LocalSGD(period=4), A.SMA(alpha=0.5)],
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


def test_slowmo_leaves_the_model_alone_when_the_inner_rate_is_zero():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with localsgd.DataParallel(model, opt, A.SlowMo(period=1, momentum=0.9)):
        for step in range(3):
            loss_step(model, opt, *batch(0, step))
        for group in opt.param_groups:
            group["lr"] = 0.0
        before = [p.detach().clone() for p in model.parameters()]
        loss_step(model, opt, *batch(0, 3))
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)


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
