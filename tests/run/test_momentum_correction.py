"""Momentum correction (Goyal et al. 2017, §2.1): SGD with the rate inside the velocity
(VelocitySGD, v ← μv + ηg, θ ← θ − v), its velocity scaled by η_new/η_old at each change of
rate, follows torch's SGD (u ← μu + g, θ ← θ − ηu) through a warmup and step decays; without
the correction it parts from it at the first change."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from localsgd.engines.simulated.communicator import check_elementwise
from localsgd.engines.simulated.stacked import StackedModel
from localsgd.records import Store
from localsgd.run import recipes
from localsgd.run.config import OptimizerConfig, ScheduleConfig, run_config
from localsgd.run.execute import execute_run
from localsgd.run.optimizers import VelocitySGD
from localsgd.run.training import train
from localsgd.run.trials import batch_key
from localsgd.util.checks import ConfigError
from run.test_checkpoints import final_model, interrupted_then_resumed, rows

STEPS = 40
# Goyal et al.'s recipe in small: linear scaling k = 4 (0.05 -> 0.2), a gradual warmup over
# the first 8 steps, then ×0.1 at half and three quarters of training.
SCHEDULE = ScheduleConfig(
    name="step", milestones=(0.5, 0.75), gamma=0.1, warmup_epochs=2, linear_scaling=True, base_batch=128
)


def rates(schedule: ScheduleConfig = SCHEDULE) -> list[float]:
    return [recipes.lr_at(t, STEPS, 4, 0.05, schedule, 512) for t in range(STEPS)]


def problem() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Two parameters of a least-squares problem in float64: gradients depend on the path,
    so any difference in the updates grows visible."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    params = [
        torch.randn(6, generator=gen, dtype=torch.float64),
        torch.randn(1, dtype=torch.float64, generator=gen),
    ]
    return params, a, b


def fresh(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.clone().requires_grad_(True) for p in params]


def groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    # Weight decay on the weights only, as build_optimizer's decay_norm_and_bias = false.
    return [{"params": [params[0]], "weight_decay": 1e-2}, {"params": [params[1]], "weight_decay": 0.0}]


def step(
    opt: torch.optim.Optimizer, params: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor, lr: float
) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad()
    loss = ((a @ params[0] + params[1] - b) ** 2).mean() + params[0].sin().sum()
    loss.backward()
    opt.step()


def trajectories(
    lrs: list[float], *, nesterov: bool, correction: bool
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """The parameters after every step under torch's SGD and under VelocitySGD."""
    init, a, b = problem()
    outside, inside = fresh(init), fresh(init)
    sgd = torch.optim.SGD(groups(outside), lr=lrs[0], momentum=0.9, nesterov=nesterov)
    vsgd = VelocitySGD(groups(inside), lr=lrs[0], momentum=0.9, nesterov=nesterov, correction=correction)
    ours, theirs = [], []
    for lr in lrs:
        step(sgd, outside, a, b, lr)
        step(vsgd, inside, a, b, lr)
        theirs.append([p.detach().clone() for p in outside])
        ours.append([p.detach().clone() for p in inside])
    return theirs, ours


def gap(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(x, y))


def test_the_schedule_warms_up_and_drops():
    lrs = rates()
    assert lrs[0] == pytest.approx(0.05) and lrs[8] == pytest.approx(0.2)
    assert all(lrs[t] < lrs[t + 1] for t in range(8))  # every warmup step changes the rate
    assert lrs[20] == pytest.approx(0.02) and lrs[30] == pytest.approx(0.002)


@pytest.mark.parametrize("nesterov", [False, True])
def test_corrected_velocity_follows_torch_sgd_step_by_step(nesterov):
    theirs, ours = trajectories(rates(), nesterov=nesterov, correction=True)
    for t, (x, y) in enumerate(zip(theirs, ours)):
        assert gap(x, y) < 1e-12, f"step {t}: {gap(x, y)}"
    assert gap(theirs[-1], theirs[0]) > 0.1  # it moved: the equality is not of standing still


@pytest.mark.parametrize("nesterov", [False, True])
def test_without_correction_it_parts_at_the_first_change_of_rate(nesterov):
    theirs, ours = trajectories(rates(), nesterov=nesterov, correction=False)
    assert gap(theirs[0], ours[0]) < 1e-12  # one rate so far: the two forms are one update
    assert gap(theirs[1], ours[1]) > 1e-4  # the rate rose 0.05 -> 0.069: v still holds 0.05·u
    assert gap(theirs[-1], ours[-1]) > 1e-3


def test_a_parameter_without_gradients_across_a_change_is_corrected_by_the_whole_change():
    # The bias gets no gradient for steps 2-5 of the warmup (its buffer rests, in both
    # forms); when it steps again its v is scaled from the rate of step 1 to that of step 6.
    lrs = rates()
    init, a, b = problem()
    outside, inside = fresh(init), fresh(init)
    sgd = torch.optim.SGD(groups(outside), lr=lrs[0], momentum=0.9)
    vsgd = VelocitySGD(groups(inside), lr=lrs[0], momentum=0.9)
    for t, lr in enumerate(lrs[:12]):
        for opt, params in ((sgd, outside), (vsgd, inside)):
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            bias = params[1] if not 2 <= t <= 5 else params[1].detach()
            (((a @ params[0] + bias - b) ** 2).mean() + params[0].sin().sum()).backward()
            opt.step()
        assert gap(outside, inside) < 1e-12, f"step {t}"
    assert not torch.equal(outside[1], init[1])


def test_at_a_fixed_rate_no_correction_is_needed():
    theirs, ours = trajectories([0.1] * 20, nesterov=False, correction=False)
    assert all(gap(x, y) < 1e-12 for x, y in zip(theirs, ours))


def test_a_step_at_rate_zero_empties_the_velocity():
    # A warmup from 0 (transformers' form): the first step has rate 0, and v = μ·0 + 0·g.
    init, a, b = problem()
    params = fresh(init)
    opt = VelocitySGD(groups(params), lr=0.0, momentum=0.9)
    step(opt, params, a, b, 0.0)
    assert all(torch.equal(p, q) for p, q in zip(params, init))
    assert all(not opt.state[p]["velocity"].any() for p in params)
    step(opt, params, a, b, 0.1)  # 0.1/0 is no correction: v starts again from ηg
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], init[0])


def test_state_dict_round_trip_mid_warmup_continues_identically():
    lrs = rates()
    init, a, b = problem()
    params = fresh(init)
    opt = VelocitySGD(groups(params), lr=lrs[0], momentum=0.9, nesterov=True)
    for lr in lrs[:4]:
        step(opt, params, a, b, lr)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert [s["velocity_lr"] for s in opt.state_dict()["state"].values()] == [lrs[3], lrs[3]]

    resumed_params = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = VelocitySGD(groups(resumed_params), lr=0.5, momentum=0.9, nesterov=True)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for lr in lrs[4:]:  # the first of them a change of rate: corrected as if never stopped
        step(opt, params, a, b, lr)
        step(resumed, resumed_params, a, b, lr)
        assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))


def test_build_optimizer_chooses_the_form():
    model = torch.nn.Linear(3, 2)
    assert type(recipes.build_optimizer(model, OptimizerConfig())) is torch.optim.SGD
    config = OptimizerConfig(momentum_form="lr_inside", momentum_correction=False, decay_norm_and_bias=False)
    opt = recipes.build_optimizer(model, config)
    assert isinstance(opt, VelocitySGD)
    assert [(g["weight_decay"], g["correction"], g["nesterov"]) for g in opt.param_groups] == [
        (5e-4, False, True),
        (0.0, False, True),
    ]


def test_the_simulated_engine_takes_an_optimizer_that_declares_itself_elementwise():
    stacked = StackedModel(torch.nn.Linear(3, 2), 2)
    check_elementwise(VelocitySGD(stacked.parameters(), lr=0.1, momentum=0.9))

    class Declared(VelocitySGD):
        elementwise = False  # type: ignore[assignment]

    with pytest.raises(ValueError, match=r"Declared is not one of .* does not declare elementwise = True"):
        check_elementwise(Declared(stacked.parameters(), lr=0.1))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"momentum_form": "inside"},
            r"optimizer.momentum_form must be one of \['lr_outside', 'lr_inside'\], got 'inside'",
        ),
        ({"momentum_correction": "yes"}, r"optimizer.momentum_correction"),
        (
            {"name": "adamw", "momentum_form": "lr_inside"},
            r"optimizer.momentum_form = 'lr_inside' is for optimizer.name = 'sgd'",
        ),
    ],
)
def test_bad_momentum_options_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        OptimizerConfig(**changes)


def spec(**optimizer: Any) -> dict[str, Any]:
    return {
        "workers": 2,
        "engine": "simulated",
        "device": "cpu",
        "seed": 3,
        "workload": {"name": "mnist1d_mlp", "num_samples": 1000},
        "algorithm": {"name": "local_sgd", "period": 2},
        "data": {"batch_size": 32},
        "optimizer": {"lr": 0.05, "momentum": 0.9, "nesterov": True, **optimizer},
        "schedule": {
            "name": "step",
            "milestones": [0.5, 0.75],
            "warmup_epochs": 1,
            "linear_scaling": True,
            "base_batch": 16,
        },
        "train": {"epochs": 3, "max_steps": 24, "eval_every": 6, "checkpoint_every": 5},
    }


def test_defaults_keep_run_ids_and_lr_inside_is_a_run_of_its_own():
    assert (
        run_config(spec()).run_id()
        == run_config(spec(momentum_form="lr_outside", momentum_correction=True)).run_id()
    )
    assert run_config(spec()).run_id() != run_config(spec(momentum_form="lr_inside")).run_id()


def test_lr_inside_runs_are_not_batched_as_trials():
    # ReplicaSGD, which steps batched trials, is the lr_outside form.
    assert batch_key(run_config(spec())) is not None
    assert batch_key(run_config(spec(momentum_form="lr_inside"))) is None


def test_a_simulated_run_with_lr_inside_equals_the_lr_outside_run(tmp_path, monkeypatch, data_cache):
    # Two replicas of local SGD through a warmup (k = 4) and two decays: the corrected
    # lr_inside run is the lr_outside run to float32 rounding; the uncorrected one is not.
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    models = {}
    for name, options in {
        "outside": {},
        "inside": {"momentum_form": "lr_inside"},
        "uncorrected": {"momentum_form": "lr_inside", "momentum_correction": False},
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        status = train(run_config(spec(**options)), folder, 0, 1)
        assert status.status == "completed"
        models[name] = torch.load(folder / "checkpoint.pt")["model"]

    def diff(name: str) -> float:
        return max(float((v - models[name][k]).abs().max()) for k, v in models["outside"].items())

    assert diff("inside") < 1e-5
    assert diff("uncorrected") > 1e-3


def test_an_lr_inside_run_resumed_mid_warmup_ends_as_the_uninterrupted_one(tmp_path):
    run = run_config(spec(momentum_form="lr_inside"))
    whole, resumed = Store(tmp_path / "whole"), Store(tmp_path / "resumed")
    assert execute_run(run, whole) == "completed"
    # 800 training samples, 2 × 32 a step: 12 steps an epoch, the warmup the first 12; the
    # interruption at step 8 resumes from the checkpoint at step 5, inside the warmup.
    interrupted_then_resumed(run, resumed, epoch=0, batch=8)
    a, b = whole.run_dir(run.run_id()), resumed.run_dir(run.run_id())
    expected, got = final_model(a), final_model(b)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert rows(a) == rows(b)
