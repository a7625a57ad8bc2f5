"""A new engine is its module and one ``register(...)`` line: defined here, it trains a run
through the ordinary training loop, and the run config treats it by the capabilities it
declares, never by its name. Its workload is an import path into this module
(``module:factory``), the other way to extend the package without touching it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from localsgd import engines, workloads
from localsgd.engines import Capability, Job, Replicas, Session
from localsgd.engines.launching.pool import LocalSession
from localsgd.engines.simulated.asynchrony import SimulatedOptions, simulated_options
from localsgd.engines.simulated.engine import SimulatedReplicas
from localsgd.records.record import EngineInfo
from localsgd.run.config import RunConfig, run_config
from localsgd.run.training import train
from localsgd.run.trials import batch_key
from localsgd.util.checks import ConfigError

WORKLOAD = f"{__name__}:blobs"
"""This module's workload factory, by import path (tests/ is on the path, as for pytest)."""


def blobs(*, num_samples: int = 240, features: int = 6, seed: int = 0) -> workloads.TensorWorkload:
    """Two Gaussian blobs in ``features`` dimensions, a linear classifier: a workload in a
    dozen lines, its options checked from the keyword parameters."""
    if num_samples < 40:
        raise ValueError(f"workload.num_samples must be >= 40, got {num_samples}")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (num_samples,), generator=g)
    x = torch.randn(num_samples, features, generator=g) + 2.0 * y[:, None].float()
    cut = num_samples * 3 // 4
    return workloads.TensorWorkload(
        name="blobs",
        num_classes=2,
        x_train=x[:cut],
        y_train=y[:cut],
        x_test=x[cut:],
        y_test=y[cut:],
        model_factory=lambda: nn.Sequential(nn.Linear(features, 2)),
        config={"num_samples": num_samples, "features": features, "seed": seed},
    )


class StackedToyEngine:
    """K replicas stacked in one process, as the simulated engine stacks them (it lends
    its replicas), declaring none of the capabilities: no trial batching, no worker
    speeds, no restarts. It reads the simulated engine's options table, so a run may ask
    for worker speeds, which it must then refuse."""

    info = EngineInfo("toy_stacked", real_wall_time=False, description="K stacked replicas, nothing more")
    capabilities = Capability(0)

    def options(self, raw: Mapping[str, Any] | None, workers: int | None = None) -> SimulatedOptions:
        return simulated_options(raw, workers)

    def processes(self, workers: int, options: Mapping[str, Any] | None = None) -> int:
        return 1

    def execute(self, job: Job) -> None:
        job.train(0, 1)

    def session(self, *, in_process: bool = True) -> Session:
        return LocalSession(self, in_process=in_process)

    def replicas(
        self,
        workload: Any,
        model: nn.Module,
        *,
        rank: int,
        world_size: int,
        workers: int,
        device: torch.device,
        delay: Mapping[str, float] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Replicas:
        return SimulatedReplicas(workload, model, workers, device, delay, self.options(options, workers))


@pytest.fixture
def toy() -> Iterator[engines.Engine]:
    engine = engines.register(StackedToyEngine())
    yield engine
    engines.unregister(engine.info.name)


def config(engine: str, **changes: Any) -> RunConfig:
    return run_config(
        {
            "workload": WORKLOAD,
            "workers": 2,
            "engine": engine,
            "seed": 1,
            "algorithm": {"name": "local_sgd", "period": 3},
            "data": {"batch_size": 8},
            "optimizer": {"lr": 0.1},
            "train": {"epochs": 2, "eval_every": 5},
            **changes,
        }
    )


def test_a_registered_engine_trains_like_the_one_it_lends_from(toy, tmp_path: Path) -> None:
    """The toy engine's run goes through the one training loop and gives what the
    simulated engine gives (the same replicas, the same seeds), with its own EngineInfo."""
    assert "toy_stacked" in engines.names() and engines.get("toy_stacked") is toy
    out = {}
    for name in ("toy_stacked", "simulated"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        status = train(config(name), run_dir, 0, 1)
        assert status.status == "completed" and status.engine is not None
        out[name] = (status, torch.load(run_dir / "checkpoint.pt")["model"])
    status, model = out["toy_stacked"]
    assert status.engine is not None and status.engine.name == "toy_stacked"
    assert status.steps == 2 * (180 - 18) // 16  # 180 training examples, 18 held out for validation
    assert status.counters.syncs == out["simulated"][0].counters.syncs == status.steps // 3 + 1
    for key, tensor in out["simulated"][1].items():
        assert torch.equal(model[key], tensor), key
    assert status.final is not None and status.final.metrics["accuracy"] > 0.6  # two separable blobs


def test_the_run_config_asks_the_declared_capabilities(toy) -> None:
    """Declaring none: worker speeds, steps by speed and restarts are refused naming the
    key, and trials are not batched; the simulated engine, which declares them, takes them."""
    with pytest.raises(
        ConfigError,
        match=r"^engine_options.worker_speeds = \[1.0, 2.0\]: engine 'toy_stacked' does not declare "
        r"worker_speeds \(it gives its workers unequal speeds .*\); engines that do: \['simulated'\]$",
    ):
        config("toy_stacked", engine_options={"worker_speeds": [1.0, 2.0]})
    with pytest.raises(
        ConfigError, match=r"^engine_options.speed_spread = 0.5: engine 'toy_stacked' does not"
    ):
        config("toy_stacked", engine_options={"speed_spread": 0.5})
    with pytest.raises(
        ConfigError, match=r"^engine_options.steps = 'by_speed': engine 'toy_stacked' does not"
    ):
        config("toy_stacked", engine_options={"steps": "by_speed"}, algorithm={"name": "async_local_sgd"})
    with pytest.raises(
        ConfigError,
        match=r"^train.max_restarts = 2: engine 'toy_stacked' does not declare restarts .*; "
        r"engines that do: \['processes', 'simulated'\]$",
    ):
        config("toy_stacked", train={"epochs": 2, "max_restarts": 2})
    # Equal speeds ask nothing of an engine.
    assert config("toy_stacked", engine_options={"worker_speeds": [1.0, 1.0]}).workers == 2
    assert config("simulated", engine_options={"worker_speeds": [1.0, 2.0]}).engine_options
    assert config("simulated", train={"epochs": 2, "max_restarts": 2}).train.max_restarts == 2
    assert not config("toy_stacked").steps_alone()
    assert batch_key(config("toy_stacked")) is None and batch_key(config("simulated")) is not None
    assert engines.having(Capability.TRIAL_BATCHING) == ["simulated"]


def test_an_engine_declaring_trial_batching_must_have_trial_replicas() -> None:
    class Claims(StackedToyEngine):
        info = EngineInfo("toy_claims")
        capabilities = Capability.TRIAL_BATCHING

    with pytest.raises(
        ValueError, match=r"engine 'toy_claims' declares trial_batching but has no trial_replicas"
    ):
        engines.register(Claims())
    assert "toy_claims" not in engines.names()


def test_an_import_path_workload_checks_its_options_and_runs(tmp_path: Path) -> None:
    built = workloads.build({"name": WORKLOAD, "num_samples": 80})
    assert (built.name, built.train_size) == (WORKLOAD, 54)  # 60 training examples, 10% held out
    with pytest.raises(ValueError, match=r"workload\.num_samples must be >= 40, got 8"):
        workloads.build({"name": WORKLOAD, "num_samples": 8})
    with pytest.raises(ConfigError, match=r"workload\.features must be an integer, got str 'six'"):
        config("processes", workload={"name": WORKLOAD, "features": "six"})
    with pytest.raises(
        ConfigError, match=r"unknown key 'workload\.width'; allowed: \['features', 'num_samples', 'seed'\]"
    ):
        config("processes", workload={"name": WORKLOAD, "width": 8})
    status = train(config("processes", workers=1, workload={"name": WORKLOAD, "features": 3}), tmp_path, 0, 1)
    assert status.status == "completed" and status.primary == "accuracy"
    assert status.steps == 2 * (180 - 18) // 8
