"""A new algorithm is its module, its registry line and its test: here all three at once.
Registered from this module, it is built from a config table, trains a run, and the block size it declares is checked against the workers by the run config
without the run config knowing its name or its field."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from localsgd import algorithms
from localsgd.algorithms._common import ModelAverager, average_model
from localsgd.algorithms.base import AlgorithmConfig, SyncContext, require_keys
from localsgd.comm.base import Block
from localsgd.run.config import run_config
from localsgd.run.training import train
from localsgd.util.checks import ConfigError, check_int

NAME = "toy_group_average"


@dataclass(frozen=True)
class GroupAverage(AlgorithmConfig):
    """Every H = ``period`` steps the workers of each group of G = ``group`` consecutive
    ranks average among themselves; groups never average with one another until the
    consensus is taken. Consistency: replicas of a group are identical after each sync."""

    SYMBOLS: ClassVar[dict[str, str]] = {"period": "H", "group": "G"}
    BLOCK_FIELDS: ClassVar[tuple[str, ...]] = ("group",)

    period: int = 2
    """H: local steps between two group averagings."""
    group: int = 2
    """G: consecutive ranks per group."""

    def __post_init__(self) -> None:
        check_int(f"{NAME}.period", self.period, 1)
        check_int(f"{NAME}.group", self.group, 1)

    @property
    def sync_period(self) -> int:
        return self.period

    def bind(self, ctx: SyncContext) -> GroupSync:
        return GroupSync(self, ctx)


class GroupSync:
    def __init__(self, config: GroupAverage, ctx: SyncContext) -> None:
        self.config, self.ctx = config, ctx
        self.block = Block(config.group)
        ctx.comm.prepare(self.block)
        self.averager = ModelAverager(ctx, True, "local")
        self.step = 0
        self.syncs = 0

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        self.step += 1
        if self.step % self.config.period == 0:
            self.averager(self.block)
            self.syncs += 1

    def write_consensus(self, *, record: bool) -> None:
        average_model(self.ctx, params=True, buffers=True, record=record)

    def finalize(self) -> None:
        self.write_consensus(record=True)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "syncs": self.syncs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        require_keys(state, ["step", "syncs"], NAME)
        self.step, self.syncs = int(state["step"]), int(state["syncs"])


@pytest.fixture
def registered() -> Iterator[type[AlgorithmConfig]]:
    cls = algorithms.register(NAME)(GroupAverage)
    yield cls
    algorithms.unregister(NAME)


def config(engine: str, workers: int, **algorithm: Any) -> Any:
    return run_config(
        {
            "workload": {"name": "mnist1d_mlp", "num_samples": 1000},
            "workers": workers,
            "engine": engine,
            "algorithm": {"name": NAME, **algorithm},
            "data": {"batch_size": 16},
            "train": {"epochs": 1, "max_steps": 8, "eval_every": 4},
        }
    )


def test_it_is_built_by_name_and_declares_its_block(registered) -> None:
    built = algorithms.build({"name": NAME, "period": 4, "group": 3})
    assert isinstance(built, GroupAverage) and built.label() == f"{NAME} H=4 G=3"
    assert built.capabilities.blocks == (("group", 3),) and not built.capabilities.asynchronous
    assert NAME in algorithms.names()
    with pytest.raises(ConfigError, match=rf"unknown key '{NAME}\.size'"):
        algorithms.build({"name": NAME, "size": 2})


def test_the_run_config_honours_the_declared_block_size(registered) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^algorithm\.group = 2 does not divide workers = 3; blocks are groups of consecutive workers$",
    ):
        config("simulated", 3, group=2)
    assert config("simulated", 4, group=2).workers == 4


def test_it_trains_with_block_averages_only(registered, tmp_path: Path, monkeypatch, data_cache: str) -> None:
    """8 steps, H = 2: 4 averagings inside blocks of 2, and the world average only when
    the consensus is taken (the exit)."""
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    status = train(config("simulated", 4, period=2, group=2), run_dir, 0, 1)
    assert status.status == "completed" and status.steps == 8
    scopes = status.counters.by_scope
    assert scopes["block2"]["collectives"] == 4 and status.counters.syncs == 4
    assert scopes["world"]["collectives"] == 1  # the exit's consensus
    model = torch.load(run_dir / "checkpoint.pt")["model"]
    assert all(torch.isfinite(t).all() for t in model.values())
