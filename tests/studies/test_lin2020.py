"""Lin et al.'s CIFAR-10 study (studies/lin2020_cifar10.toml) and its MNIST-1D twin: the
paper's rows and settings, the twin's same grid shape, and the CIFAR-10 grid trained end
to end (ResNet-20 at K = 2, a few steps) on small files in the real cifar-10-batches-py
format."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from localsgd.records import Store
from localsgd.run.config import RunConfig, run_config
from localsgd.studies.grid import Study
from localsgd.studies.loading import load_study
from localsgd.studies.runner import run_study
from workloads.test_cifar10 import _files, _folder

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2] / "studies"


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data_batch_1..5 and test_batch of 20 images each, pickled as the official ones."""
    return _folder(tmp_path_factory.mktemp("cifar"), _files())


@pytest.fixture(scope="module")
def cifar_study(cifar_folder: Path) -> Study:
    return load_study(ROOT / "lin2020_cifar10.toml", [f"workload.data_path='{cifar_folder}'"])


def row(run: RunConfig) -> tuple[Any, ...]:
    """A run's place in the grid, in units the two studies share: the algorithm's fields
    (epochs as a fraction of training), K, B over the base batch, the delay and the seed."""
    algorithm = dict(run.algorithm)
    if "switch_epoch" in algorithm:
        algorithm["switch_epoch"] /= run.train.epochs
    base = 16 if run.workload_name == "mnist1d_cnn" else 128
    return (
        tuple(sorted(algorithm.items())),
        run.workers,
        run.data.batch_size / base,
        run.comm.delay.get("world"),
        run.seed,
    )


def test_the_cifar10_study_holds_the_papers_rows_at_their_settings(
    cifar_study: Study, cifar_folder: Path
) -> None:
    runs = cifar_study.runs
    assert len(runs) == 42
    for run in runs:
        assert run.workload == {"name": "cifar10_resnet20", "data_path": str(cifar_folder)}
        assert run.train.epochs == 300 and run.seed in (0, 1, 2)
        assert (run.optimizer.lr, run.optimizer.momentum, run.optimizer.weight_decay) == (0.1, 0.9, 1e-4)
        schedule = run.schedule
        assert (schedule.name, schedule.milestones, schedule.gamma) == ("step", (0.5, 0.75), 0.1)
        assert (schedule.linear_scaling, schedule.base_batch) == (True, 128)
        assert (schedule.warmup_epochs, schedule.warmup) == (5.0, "gradual")
    rows = {(r.algorithm["name"], r.workers, r.data.batch_size, r.engine) for r in runs}
    assert {
        ("minibatch_sgd", 1, 128, "processes"),  # A1
        ("minibatch_sgd", 16, 128, "processes"),  # A2
        ("minibatch_sgd", 16, 512, "processes"),  # A3: A4's effective batch
        ("local_sgd", 16, 128, "processes"),  # A4
        ("post_local_sgd", 16, 128, "processes"),  # A5
        ("hierarchical_local_sgd", 4, 128, "simulated"),
    } == rows
    a4 = next(r for r in runs if r.algorithm["name"] == "local_sgd")
    a5 = next(r for r in runs if r.algorithm["name"] == "post_local_sgd")
    assert a4.algorithm_config(1).period == 4 and a5.algorithm_config(1).period == 16
    # A5 switches at the first decay: half of training.
    assert a5.algorithm["switch_epoch"] == schedule.milestones[0] * a5.train.epochs == 150
    hierarchical = [r for r in runs if r.algorithm["name"] == "hierarchical_local_sgd"]
    assert {(r.algorithm["block_period"], r.comm.delay["world"]) for r in hierarchical} == {
        (hb, delay) for hb in (1, 4, 16) for delay in (0.0, 1.0, 50.0)
    }
    assert all(r.algorithm["period"] == 2 and r.algorithm["block_size"] == 2 for r in hierarchical)


def test_the_mnist1d_twin_has_the_same_grid_shape(cifar_study: Study) -> None:
    twin = load_study(ROOT / "lin2020_mnist1d.toml").runs
    assert {run.engine for run in twin} == {"simulated"}
    assert {run.workload_name for run in twin} == {"mnist1d_cnn"}
    assert sorted(map(row, twin)) == sorted(map(row, cifar_study.runs))
    # K = 16 at 4·B still takes whole steps per epoch of the 16 000 training samples.
    a3 = max(twin, key=lambda r: r.global_batch)
    assert a3.global_batch == 16 * 64 and 16_000 // a3.global_batch >= 15


def shrunk(run: RunConfig) -> RunConfig:
    """The run at K = 2 (blocks of one for hierarchical local SGD), B / 64, one epoch of at
    most 3 steps, evaluated every 2; switch points keep their fraction of training."""
    data = run.to_dict()
    data["workers"] = min(run.workers, 2)
    data["data"]["batch_size"] = run.data.batch_size // 64
    algorithm = data["algorithm"]
    if "block_size" in algorithm:
        algorithm["block_size"] = 1
    if "switch_epoch" in algorithm:
        algorithm["switch_epoch"] /= run.train.epochs
    data["schedule"]["warmup_epochs"] = run.schedule.warmup_epochs / run.train.epochs
    data["train"].update(epochs=1.0, max_steps=3, eval_every=2)
    data["device"] = "cpu"
    return run_config(data)


def test_the_cifar10_grid_trains_resnet20_end_to_end(cifar_study: Study, tmp_path: Path) -> None:
    # Seed 0 of every row, and one delay of each hierarchical H_b; the K = 2 local SGD row
    # on the study's own processes engine (two worker processes), the others simulated.
    chosen, seen = [], set()
    for run in cifar_study.runs:
        key = (run.algorithm["name"], run.workers, run.data.batch_size, run.algorithm.get("block_period"))
        if run.seed == 0 and key not in seen:
            seen.add(key)
            small = shrunk(run)
            keep = small.algorithm["name"] == "local_sgd"
            chosen.append(small if keep else small.replace(engine="simulated"))
    assert len(chosen) == 8 and sum(r.engine == "processes" for r in chosen) == 1
    counts = run_study(Study(cifar_study.section, chosen), tmp_path / "store", progress=False)
    assert counts == {"completed": 8}
    records = Store(tmp_path / "store", create=False).records()
    assert len(records) == 8
    engines = {
        r.config["algorithm"]["name"]: r.status_info.engine.name for r in records if r.status_info.engine
    }
    assert engines["local_sgd"] == "processes" and engines["minibatch_sgd"] == "simulated"
    for record in records:
        info = record.status_info
        assert record.status == "completed" and info.steps == 3
        final = info.final
        assert final is not None and final.train_loss is not None and math.isfinite(final.train_loss)
        assert set(final.metrics) >= {"accuracy", "eval_loss"}
        assert all(math.isfinite(v) for v in final.metrics.values())
        assert 0.0 <= final.metrics["accuracy"] <= 1.0
        workers = record.config["workers"]
        assert (info.counters.bytes > 0) == (workers > 1), record.config["algorithm"]
