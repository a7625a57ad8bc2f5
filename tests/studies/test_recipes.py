"""Learning-rate schedules and optimizer recipes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from localsgd.studies import recipes
from localsgd.studies.schema import ScheduleConfig, run_config


def test_learning_rate_schedules():
    lr = 0.1

    def at(step: int, **kw) -> float:
        return recipes.lr_at(step, 100, 10, lr, ScheduleConfig(**kw), global_batch=512)

    assert at(0) == at(99) == lr
    assert [at(s, name="step", milestones=(0.5, 0.75)) for s in (49, 50, 74, 75)] == pytest.approx(
        [0.1, 0.01, 0.01, 0.001]
    )
    assert at(0, name="cosine") == pytest.approx(lr)
    assert at(50, name="cosine") == pytest.approx(lr / 2)
    assert at(100, name="cosine") == pytest.approx(0.0, abs=1e-12)
    assert at(49, name="half_cosine") == lr
    assert at(75, name="half_cosine") == pytest.approx(lr / 2)
    # Linear scaling: 512 / 128 = 4x; warmup over 2 epochs (20 steps) from the base rate.
    scaled = {"linear_scaling": True, "base_batch": 128, "warmup_epochs": 2.0}
    assert at(0, **scaled) == pytest.approx(0.1)
    assert at(10, **scaled) == pytest.approx(0.25)
    assert at(20, **scaled) == pytest.approx(0.4)
    assert at(99, **scaled) == pytest.approx(0.4)


def test_linear_schedule_with_warmup_matches_transformers():
    transformers = pytest.importorskip("transformers")
    total, peak = 50, 0.2
    for warmup in ({"warmup_steps": 7}, {"warmup_ratio": 0.1}, {}):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
        steps = warmup.get("warmup_steps", math.ceil(warmup.get("warmup_ratio", 0.0) * total))
        sched = transformers.get_linear_schedule_with_warmup(opt, steps, total)
        for step in range(total):
            ours = recipes.lr_at(step, total, 10, peak, ScheduleConfig(name="linear", **warmup), 32)
            assert ours == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), (warmup, step)
            opt.step()
            sched.step()
    with pytest.raises(ValueError, match="give one of warmup_epochs"):
        ScheduleConfig(warmup_steps=3, warmup_ratio=0.1)
    with pytest.raises(ValueError, match=r"schedule\.warmup_ratio must be a finite number >= 0 and < 1"):
        ScheduleConfig(warmup_ratio=1.5)
    with pytest.raises(ValueError, match=r"train\.precision must be one of \['fp32', 'bf16', 'fp16'\]"):
        run_config({"train": {"precision": "fp8"}})


def test_optimizer_recipes():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    config = run_config({"optimizer": {"decay_norm_and_bias": False, "weight_decay": 0.01}}).optimizer
    opt = recipes.build_optimizer(model, config)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.01 and all(p.ndim == 2 for p in decayed["params"])
    assert exempt["weight_decay"] == 0.0 and len(exempt["params"]) == 4  # 2 biases, BN weight and bias
    adamw = recipes.build_optimizer(model, run_config({"optimizer": {"name": "adamw", "lr": 1e-3}}).optimizer)
    assert isinstance(adamw, torch.optim.AdamW) and len(adamw.param_groups) == 1


def test_constant_warmup_holds_the_base_rate_then_jumps_to_the_scaled_one():
    # Goyal et al. (2017), Table 1: the small-batch rate for W epochs, then k times it.
    def at(step: int, warmup: str) -> float:
        schedule = ScheduleConfig(linear_scaling=True, base_batch=128, warmup_epochs=2.0, warmup=warmup)
        return recipes.lr_at(step, 100, 10, 0.1, schedule, global_batch=512)

    assert [at(s, "constant") for s in (0, 10, 19, 20, 99)] == pytest.approx([0.1, 0.1, 0.1, 0.4, 0.4])
    assert [at(s, "gradual") for s in (0, 10, 19, 20)] == pytest.approx([0.1, 0.25, 0.385, 0.4])
    with pytest.raises(ValueError, match=r"schedule\.warmup must be one of"):
        ScheduleConfig(warmup="linear")
    with pytest.raises(ValueError, match=r'schedule\.warmup = "constant"'):
        ScheduleConfig(warmup="constant", warmup_steps=5)


def test_the_default_warmup_leaves_run_ids_unchanged():
    base = run_config({"workload": "mnist1d_cnn", "schedule": {"warmup_epochs": 1.0}})
    gradual = run_config({"workload": "mnist1d_cnn", "schedule": {"warmup_epochs": 1.0, "warmup": "gradual"}})
    constant = run_config({"workload": "mnist1d_cnn", "schedule": {"warmup_epochs": 1.0, "warmup": "constant"}})
    assert base.run_id() == gradual.run_id() != constant.run_id()
    assert base.to_dict()["schedule"]["warmup"] == "gradual"  # recorded with the run, not in its id
