"""The algorithm registry: every registered config validates, documents and round-trips its fields."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from localsgd import algorithms as A

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
    (A.SlowMo, {"outer_momentum": 1.0}, "slowmo.outer_momentum"),
    (A.SlowMo, {"outer_momentum": -0.1}, "slowmo.outer_momentum"),
    (A.SlowMo, {"outer_lr": 0.0}, "slowmo.outer_lr"),
    (A.SlowMo, {"outer_lr": float("inf")}, "slowmo.outer_lr"),
    (A.SlowMo, {"momentum": 0.5}, "slowmo.momentum was renamed: use slowmo.outer_momentum"),
    (A.SlowMo, {"lr": 1.0}, "slowmo.lr was renamed: use slowmo.outer_lr"),
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

    assert set(A.names()) >= set(
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
    assert A.build({"name": "slowmo", "outer_lr": 2}) == A.SlowMo(outer_lr=2.0)
    with pytest.raises(ValueError, match=r"slowmo\.lr was renamed: use slowmo\.outer_lr"):
        A.build({"name": "slowmo", "lr": 2})
    assert A.build({"name": "sma", "alpha": None}) == A.SMA()
    with pytest.raises(ValueError, match=r"unknown key 'local_sgd.perod'; allowed: \['average_buffers'"):
        A.build({"name": "local_sgd", "perod": 8})
    with pytest.raises(ValueError, match=r"local_sgd\.period must be an integer, got str '8'"):
        A.build({"name": "local_sgd", "period": "8"})
    with pytest.raises(ValueError, match=r"local_sgd\.average_buffers must be true or false"):
        A.build({"name": "local_sgd", "average_buffers": "yes"})
    with pytest.raises(
        ValueError, match=r"algorithm name 'localsgd' is unknown; allowed: \['async_local_sgd', 'diloco'"
    ):
        A.build({"name": "localsgd"})
    with pytest.raises(ValueError, match="needs a 'name' key"):
        A.build({"period": 8})
    with pytest.raises(ValueError, match="must be a mapping"):
        A.build("local_sgd")  # type: ignore[arg-type]


# Paper symbols and the H of the H·K view live on each config: the report reads them from
# here, so a new algorithm needs no table anywhere else.
LABELS = [
    (A.MiniBatchSGD(), "minibatch_sgd", 1),
    (A.GradientAccumulation(steps=4), "gradient_accumulation k=4", 1),
    (A.LocalSGD(period=16), "local_sgd H=16", 16),
    (A.LocalSGD(period=4, optimizer_state="reset"), "local_sgd H=4 optimizer_state=reset", 4),
    (A.PostLocalSGD(switch_step=100, period=8), "post_local_sgd t'=100 H=8", 8),
    (
        A.HierarchicalLocalSGD(period=2, block_period=4, block_size=2),
        "hierarchical_local_sgd H=2 Hb=4 G=2",
        2,
    ),
    (A.SlowMo(period=8, outer_momentum=0.5, outer_lr=1.0), "slowmo H=8 μ=0.5 η=1", 8),
    (A.DiLoCo(period=16), "diloco H=16 η=0.7 μ=0.9", 16),
    (A.SMA(), "sma λ=1/K μ=0.9", None),
]


@pytest.mark.parametrize("config,label,period", LABELS, ids=lambda x: getattr(x, "name", None))
def test_labels_and_periods_come_from_the_config(config, label, period):
    assert config.label() == label
    assert config.sync_period == period


def test_every_symbol_names_a_field():
    for name in A.names():
        cls = A.get(name)
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(cls.SYMBOLS) <= fields, name
        assert not set(cls.RENAMED) & fields, name
