"""Learning-rate schedules and optimizer recipes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from localsgd.run import recipes
from localsgd.run.config import ScheduleConfig, run_config


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
    # After a warmup, cosine decays over the steps that follow it: the peak at its end.
    assert at(20, name="cosine", **scaled) == pytest.approx(0.4)
    assert at(60, name="cosine", **scaled) == pytest.approx(0.2)


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


def _expected_after_warmup(step: int, total: int, warm: int, peak: float, schedule: ScheduleConfig) -> float:
    """The named schedule from the peak, written out independently of recipes.DECAYS."""
    if schedule.name == "constant":
        return peak
    if schedule.name == "step":
        return peak * schedule.gamma ** sum(1 for m in schedule.milestones if step / total >= m)
    p = (step - warm) / (total - warm)
    if schedule.name == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * p))
    if schedule.name == "half_cosine":
        return peak if p < 0.5 else peak * 0.5 * (1 + math.cos(math.pi * (2 * p - 1)))
    assert schedule.name == "linear", schedule.name
    return peak * (1 - p)


def test_warmup_only_rises_to_the_peak_then_follows_the_named_schedule():
    # A grid of (K, B, base_batch, lr, warmup kind, start, schedule): the recorded rate never
    # exceeds the peak, rises (or holds) during the warmup, is the peak at its end, and is the
    # named schedule after it. steps per epoch 10, 100 steps, warmup 2 epochs (step decays at
    # 50 % and 75 %, after the warmup).
    total, per_epoch = 100, 10
    cases = 0
    for workers, batch, base_batch, lr, kind, start, name in itertools.product(
        (1, 4, 16),
        (16, 128),
        (32, 256),
        (0.05, 0.2),
        ("gradual", "constant"),
        (None, "base", 0.0, 0.25),
        ("constant", "step", "cosine", "half_cosine", "linear"),
    ):
        schedule = ScheduleConfig(
            name=name,
            linear_scaling=True,
            base_batch=base_batch,
            warmup_epochs=2.0,
            warmup=kind,
            warmup_start=start,
        )
        global_batch = workers * batch
        peak = lr * global_batch / base_batch
        warm = recipes.plan_warmup(schedule, total, per_epoch, lr, global_batch)
        rates = [recipes.lr_at(s, total, per_epoch, lr, schedule, global_batch) for s in range(total)]
        where = (workers, batch, base_batch, lr, kind, start, name)
        assert warm.peak_lr == pytest.approx(peak), where
        assert max(rates) <= peak * (1 + 1e-12), where
        if start in (None, "base") and peak <= lr:
            # k <= 1: a warmup from the base rate would fall; none is taken, and it is said.
            assert warm.steps == 0 and warm.note.startswith("no warmup needed"), where
        else:
            assert warm.steps == 20 and warm.start_lr <= peak, where
            during = rates[: warm.steps]
            assert all(a <= b + 1e-15 for a, b in itertools.pairwise(during)), where
            assert rates[warm.steps] == pytest.approx(peak), where
            expected_start = lr if start in (None, "base") else float(start) * peak
            assert rates[0] == pytest.approx(expected_start), where
        for s in range(warm.steps, total):
            expected = _expected_after_warmup(s, total, warm.steps, peak, schedule)
            assert rates[s] == pytest.approx(expected, abs=1e-12), (where, s)
        cases += 1
    assert cases == 3 * 2 * 2 * 2 * 2 * 4 * 5


def test_warmup_settings_are_checked():
    with pytest.raises(ValueError, match=r'schedule\.warmup_start must be "base"'):
        ScheduleConfig(warmup_epochs=1.0, warmup_start=1.5)
    with pytest.raises(ValueError, match=r'schedule\.warmup_start must be "base"'):
        ScheduleConfig(warmup_epochs=1.0, warmup_start="peak")
    with pytest.raises(ValueError, match=r"schedule\.milestones\[0\] = 0.1 of 10 epochs falls inside the warmup"):
        run_config({"schedule": {"name": "step", "milestones": [0.1, 0.5], "warmup_epochs": 2.0}})
    # From zero: transformers' warmup, the default start of warmup_steps.
    assert ScheduleConfig(warmup_steps=5).start_of_warmup() == 0.0
    assert ScheduleConfig(warmup_epochs=1.0).start_of_warmup() == "base"


def test_a_small_global_batch_takes_no_backwards_warmup_and_says_so(tmp_path, monkeypatch, data_cache):
    # K = 1, B = 16, base_batch 256: the scaled rate is 1/16 of optimizer.lr. The old recipe
    # "warmed up" from lr down to it; now the recorded rate never exceeds the post-warmup rate.
    from localsgd import engines
    from localsgd.records import Store
    from localsgd.run.execute import execute_run

    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    config = run_config(
        {
            "workload": {"name": "mnist1d_mlp", "num_samples": 1000},
            "engine": "simulated",
            "data": {"batch_size": 16},
            "optimizer": {"lr": 0.2},
            "schedule": {"linear_scaling": True, "base_batch": 256, "warmup_epochs": 0.5},
            "train": {"epochs": 1, "eval_every": 1},
        }
    )
    store = Store(tmp_path / "store")
    assert execute_run(config, store, session=engines.get("simulated").session(in_process=True)) == "completed"
    (record,) = store.records()
    rates = [row.lr for row in record.metrics()]
    assert len(rates) == 45 and max(rates) == pytest.approx(0.2 * 16 / 256)
    schedule = record.status_info.schedule
    assert (schedule["warmup_steps"], schedule["peak_lr"]) == (0, pytest.approx(0.0125))
    assert schedule["note"].startswith("no warmup needed: the peak rate 0.0125 is not above the base rate 0.2")
    # Every row holds the metrics on both splits, and the record says which is which.
    assert all(set(row.validation) == set(row.metrics) == {"accuracy", "eval_loss"} for row in record.metrics())
    assert record.status_info.splits == {
        "metrics": "test split",
        "validation": "validation split: 80 examples held out of the training data, never trained on",
    }
