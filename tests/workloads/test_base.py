"""The workload contract: registry and import paths, declared metrics, sharding, in-memory batches."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from localsgd import workloads
from localsgd.util.checks import ConfigError
from localsgd.workloads.base import derive_seed
from workloads.conftest import N_TEST, N_TRAIN, N_VALIDATION, NUM_SAMPLES


def test_names_and_options() -> None:
    names = workloads.names()
    assert names == sorted(names)
    assert {"cifar10_resnet20", "mnist1d_cnn", "mnist1d_mlp", "mnli", "squad", "mlm"} <= set(names)
    assert workloads.DEFAULT == "mnist1d_cnn"
    _, options, takes_dataclass = workloads.check_spec("mnist1d_cnn")
    assert takes_dataclass and dataclasses.asdict(options) == {
        "num_samples": 20000,
        "seed": 42,
        "data_path": None,
        "train_error": False,
        "validation_fraction": 0.1,
    }


def test_unknown_name_lists_allowed() -> None:
    with pytest.raises(
        ConfigError,
        match=re.escape(f"workload = 'imagenet' is not a registered workload {workloads.names()} nor an import path"),
    ):
        workloads.build("imagenet")


def test_unknown_option_lists_allowed() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'workload\.batch_size'; allowed: \['data_path', 'num_samples', 'seed', 'train_error', "
        r"'validation_fraction'\]",
    ):
        workloads.build("mnist1d_cnn", batch_size=64)


def test_sizes_config_and_declared_metrics(cnn: workloads.Workload) -> None:
    sizes = (cnn.train_size, cnn.validation_size, cnn.test_size)
    assert (cnn.name, cnn.num_classes, sizes) == ("mnist1d_cnn", 10, (N_TRAIN, N_VALIDATION, N_TEST))
    assert cnn.config == {
        "num_samples": NUM_SAMPLES,
        "seed": 42,
        "data_path": None,
        "train_error": False,
        "validation_fraction": 0.1,
    }
    assert [m.name for m in cnn.metrics] == ["accuracy", "eval_loss"] and cnn.primary == "accuracy"
    accuracy = workloads.metric(cnn)
    assert (accuracy.higher_is_better, accuracy.unit, accuracy.scale) == (True, "%", 100.0)
    assert not workloads.metric(cnn, "eval_loss").higher_is_better
    assert isinstance(cnn, workloads.Workload)


# -- import paths ---------------------------------------------------------------------------

MODULE = """
from dataclasses import dataclass

from localsgd import workloads


@dataclass(frozen=True)
class Options:
    num_samples: int = 1000

    def __post_init__(self):
        if self.num_samples < 100:
            raise ValueError(f"workload.num_samples must be >= 100, got {self.num_samples}")


def make(options: Options):
    return workloads.build("mnist1d_mlp", num_samples=options.num_samples)


def keywords(*, num_samples: int = 1000, tag: str = "x"):
    wl = workloads.build("mnist1d_mlp", num_samples=num_samples)
    wl.tag = tag
    return wl
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch, cache_home) -> str:
    (tmp_path / "user_wl.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)  # the current directory is importable, as for python -m
    monkeypatch.delitem(sys.modules, "user_wl", raising=False)
    return "user_wl"


def test_import_paths_build_with_the_factorys_own_options(user_module: str) -> None:
    built = workloads.build({"name": f"{user_module}:make", "num_samples": 1000})
    assert built.name == f"{user_module}:make" and built.train_size == N_TRAIN
    by_keywords = workloads.build(f"{user_module}:keywords", tag="y")
    assert by_keywords.tag == "y"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"workload\.num_samples must be >= 100, got 5"):
        workloads.build(f"{user_module}:make", num_samples=5)
    with pytest.raises(ConfigError, match=r"workload\.tag must be a string, got int 3"):
        workloads.build(f"{user_module}:keywords", tag=3)
    with pytest.raises(ConfigError, match=r"unknown key 'workload\.size'; allowed: \['num_samples'\]"):
        workloads.check_spec({"name": f"{user_module}:make", "size": 3})


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            "nosuchmodule:f",
            r"^workload = 'nosuchmodule:f': cannot import 'nosuchmodule' \(ModuleNotFoundError",
        ),
        ("os:getcwd", r"^workload = 'os:getcwd' returned str, not a workload: it lacks metrics, primary"),
        ("os:nope", r"^workload = 'os:nope': module 'os' has no 'nope'$"),
        ("os:sep", r"^workload = 'os:sep': 'sep' is a str, not a function$"),
        (":f", r"^workload = ':f': an import path is 'package\.module:function'$"),
    ],
)
def test_bad_import_paths_are_one_line_errors_naming_the_key(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        workloads.build(spec)
    assert "\n" not in str(info.value)


def test_metric_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="metric name 'step' is reserved"):
        workloads.Metric("step")
    with pytest.raises(ValueError, match="must be an identifier"):
        workloads.Metric("f1 score")
    loss = workloads.Metric("eval_loss", higher_is_better=False)
    assert loss.best([3.0, 1.0, float("nan"), 2.0]) == 1.0 and loss.reached(0.9, 1.0)
    assert workloads.ACCURACY.best([0.5, 0.7]) == 0.7 and not workloads.ACCURACY.reached(0.6, 0.7)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shards_are_disjoint_equal_and_cover_floor(world_size: int) -> None:
    n = 1001
    shards = [workloads.shard_indices(n, r, world_size, epoch=3, seed=5) for r in range(world_size)]
    per_rank = n // world_size
    assert [len(s) for s in shards] == [per_rank] * world_size
    union = torch.cat(shards)
    assert len(torch.unique(union)) == per_rank * world_size  # disjoint
    assert int(union.min()) >= 0 and int(union.max()) < n
    # Contiguous pieces of one permutation that depends on (seed, epoch) only.
    perm = torch.randperm(n, generator=workloads.shuffle_generator(5, 3))
    assert torch.equal(union, perm[: per_rank * world_size])


def test_shards_depend_on_seed_and_epoch_only() -> None:
    a = workloads.shard_indices(800, 1, 4, epoch=2, seed=7)
    assert torch.equal(a, workloads.shard_indices(800, 1, 4, epoch=2, seed=7))
    assert not torch.equal(a, workloads.shard_indices(800, 1, 4, epoch=3, seed=7))
    assert not torch.equal(a, workloads.shard_indices(800, 1, 4, epoch=2, seed=8))
    # The global permutation is the same whatever the world size.
    two = torch.cat([workloads.shard_indices(800, r, 2, epoch=2, seed=7) for r in range(2)])
    four = torch.cat([workloads.shard_indices(800, r, 4, epoch=2, seed=7) for r in range(4)])
    assert torch.equal(two, four)


def test_shuffle_and_augment_seeds_do_not_collide() -> None:
    # numpy's SeedSequence pads with zeros: without domain tags (7, 0) and (7, 0, 0) would meet.
    shuffle = workloads.shuffle_generator(7, 0).initial_seed()
    augment = workloads.augment_generator(7, 0, 0).initial_seed()
    assert shuffle != augment
    assert len({derive_seed(1, s, e) for s in range(20) for e in range(20)}) == 400
    assert workloads.augment_generator(7, 0, 1).initial_seed() != augment


def test_train_batches_follow_the_shards(cnn: workloads.Workload, arrays: dict[str, np.ndarray]) -> None:
    world_size, batch_size, epoch, seed = 3, 32, 1, 11
    steps = cnn.steps_per_epoch(world_size, batch_size)
    assert steps == (N_TRAIN // world_size) // batch_size == 7
    # The examples trained on: the generated training split less the held-out validation.
    kept, _ = workloads.validation_split(N_TRAIN + N_VALIDATION, 0.1)
    x_all = torch.as_tensor(arrays["x"], dtype=torch.float32)[kept]
    y_all = torch.as_tensor(arrays["y"])[kept]
    seen = []
    for rank in range(world_size):
        batches = list(cnn.train_batches(rank, world_size, batch_size, epoch, seed, "cpu"))
        assert len(batches) == steps
        shard = workloads.shard_indices(N_TRAIN, rank, world_size, epoch, seed)
        idx = shard[: steps * batch_size]
        assert all(set(b) == {"x", "y"} for b in batches)
        x = torch.cat([b["x"] for b in batches])
        y = torch.cat([b["y"] for b in batches])
        assert all(b["x"].shape == (batch_size, 40) and b["x"].dtype == torch.float32 for b in batches)
        assert all(b["y"].shape == (batch_size,) and b["y"].dtype == torch.long for b in batches)
        torch.testing.assert_close(x, x_all[idx], rtol=0, atol=0)
        assert torch.equal(y, y_all[idx])
        seen.append(idx)
    assert len(torch.unique(torch.cat(seen))) == world_size * steps * batch_size


def stacked_one_by_one(workload: workloads.Workload, streams: list, batch_size: int, epoch: int) -> list:
    """What stacking the streams' own batches gives: the reference for stacked_train_batches."""
    per_stream = [
        list(workload.train_batches(r, w, batch_size, epoch, seed, "cpu")) for r, w, seed in streams
    ]
    return [{k: torch.stack([b[k] for b in group]) for k in group[0]} for group in zip(*per_stream)]


def test_stacked_train_batches_equal_the_streams_batches_stacked(cnn: workloads.Workload) -> None:
    # Two trials (seeds 5 and 9) of 3 replicas each, as a batched search stacks them.
    streams = [(rank, 3, seed) for seed in (5, 9) for rank in range(3)]
    got = list(workloads.stacked_train_batches(cnn, streams, 32, 2, "cpu"))
    want = stacked_one_by_one(cnn, streams, 32, 2)
    assert len(got) == len(want) == cnn.steps_per_epoch(3, 32) == 7
    for g, w in zip(got, want):
        assert g["x"].shape == (6, 32, 40) and g["y"].shape == (6, 32)
        assert torch.equal(g["x"], w["x"]) and torch.equal(g["y"], w["y"])
    # Streams of unequal lengths stop with the shortest, as zipping them does.
    mixed = [(0, 3, 1), (1, 2, 1)]
    got = workloads.stacked_train_batches(cnn, mixed, 32, 0, "cpu")
    same = [torch.equal(g["y"], w["y"]) for g, w in zip(got, stacked_one_by_one(cnn, mixed, 32, 0), strict=True)]
    assert same == [True] * cnn.steps_per_epoch(3, 32)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\) for world_size 2, got 2"):
        workloads.stacked_train_batches(cnn, [(0, 2, 0), (2, 2, 0)], 32, 0, "cpu")


def test_stacked_train_batches_come_from_a_train_batches_replaced_or_overridden(
    cnn: workloads.Workload,
) -> None:
    def doubled(rank, world_size, batch_size, epoch, seed, device):
        for data in type(cnn).train_batches(cnn, rank, world_size, batch_size, epoch, seed, device):  # type: ignore[arg-type]
            yield {"x": data["x"] * 2, "y": data["y"]}

    streams = [(0, 2, 1), (1, 2, 1)]
    plain = list(workloads.stacked_train_batches(cnn, streams, 32, 0, "cpu"))
    patched = copy.copy(cnn)
    patched.train_batches = doubled  # type: ignore[method-assign]
    got = workloads.stacked_train_batches(patched, streams, 32, 0, "cpu")
    assert all(torch.equal(p["x"], 2 * q["x"]) for p, q in zip(got, plain, strict=True))

    class Doubled(type(cnn)):  # type: ignore[misc]
        def train_batches(self, *args):
            return doubled(*args)

    sub = copy.copy(cnn)
    sub.__class__ = Doubled
    got = workloads.stacked_train_batches(sub, streams, 32, 0, "cpu")
    assert all(torch.equal(p["x"], 2 * q["x"]) for p, q in zip(got, plain, strict=True))

    class Wrapper:
        """Its own train_batches; everything else, the stacked method included, from inside."""

        def __getattr__(self, name):
            return getattr(cnn, name)

        def train_batches(self, *args):
            return doubled(*args)

    got = workloads.stacked_train_batches(Wrapper(), streams, 32, 0, "cpu")  # type: ignore[arg-type]
    assert all(torch.equal(p["x"], 2 * q["x"]) for p, q in zip(got, plain, strict=True))


def test_stacked_train_batches_of_a_workload_without_its_own_method() -> None:
    class Counting:
        """Only the workload contract's train_batches: batch t of stream (rank, seed) is t + 10·rank + seed."""

        def train_batches(self, rank, world_size, batch_size, epoch, seed, device):
            batches = [{"x": torch.full((batch_size,), float(t + 10 * rank + seed))} for t in range(3 - rank)]
            return iter(batches)

    got = list(workloads.stacked_train_batches(Counting(), [(0, 2, 1), (1, 2, 1)], 4, 0, "cpu"))  # type: ignore[arg-type]
    assert [g["x"][:, 0].tolist() for g in got] == [[1.0, 11.0], [2.0, 12.0]]


def test_train_batches_reshuffle_every_epoch(cnn: workloads.Workload) -> None:
    def first(epoch: int, seed: int) -> torch.Tensor:
        return next(iter(cnn.train_batches(0, 2, 64, epoch, seed, torch.device("cpu"))))["y"]

    assert torch.equal(first(0, 0), first(0, 0))
    assert not torch.equal(first(0, 0), first(1, 0))
    assert not torch.equal(first(0, 0), first(0, 1))


def test_train_batch_errors(cnn: workloads.Workload) -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\) for world_size 2, got 2"):
        cnn.train_batches(2, 2, 32, 0, 0, "cpu")  # raised on the call, not on first next()
    with pytest.raises(ValueError, match=r"batch_size must be <= 180 \(train_size 720 // world_size 4\)"):
        cnn.steps_per_epoch(4, 181)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        cnn.steps_per_epoch(1, 0)
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0"):
        cnn.train_batches(0, 1, 32, -1, 0, "cpu")
    assert cnn.steps_per_epoch(4, 180) == 1


def test_importing_workloads_does_not_import_generators() -> None:
    code = (
        "import sys, localsgd; assert 'localsgd.workloads' not in sys.modules;"
        "import localsgd.workloads; bad = {'mnist1d', 'matplotlib', 'torchvision'} & set(sys.modules);"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class ConstantLogits(nn.Module):
    """Logit ``a`` for class 0 and 0 for the rest, whatever the input; records its mode."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        logits = torch.zeros(len(x), 10)
        logits[:, 0] = self.a
        return logits


def test_evaluate_known_model(cnn: workloads.Workload, arrays: dict[str, np.ndarray]) -> None:
    a = 2.0
    y = arrays["y_test"]
    p0 = math.exp(a) / (math.exp(a) + 9)
    want_loss = float(np.mean(np.where(y == 0, -math.log(p0), -math.log((1 - p0) / 9))))
    model = ConstantLogits(a)
    cnn.eval_batch_size = 64  # type: ignore[attr-defined]
    metrics = cnn.evaluate(model, "cpu")
    del cnn.eval_batch_size  # type: ignore[attr-defined]
    assert set(metrics) == {"accuracy", "eval_loss"}
    assert metrics["accuracy"] == pytest.approx(float(np.mean(y == 0)))
    assert 0.0 < metrics["accuracy"] < 0.3
    assert metrics["eval_loss"] == pytest.approx(want_loss, rel=1e-6)
    assert model.modes == [False] * math.ceil(N_TEST / 64)  # eval mode, every test sample
    assert model.training  # train mode restored
    model.eval()
    cnn.evaluate(model, "cpu")
    assert not model.training  # ... and eval mode kept


def test_loss_is_mean_cross_entropy_of_the_models_logits(cnn: workloads.Workload) -> None:
    logits = torch.tensor([[0.0, math.log(3.0)] + [-math.inf] * 8, [0.0] * 10])
    batch = {"x": torch.zeros(2, 40), "y": torch.tensor([1, 4])}

    def model(x: torch.Tensor) -> torch.Tensor:
        return logits

    assert cnn.loss(model, batch).item() == pytest.approx((-math.log(3 / 4) + math.log(10)) / 2)


def test_the_validation_split_is_held_out_of_training(tmp_path, monkeypatch, data_cache):
    import torch

    from localsgd import workloads
    from localsgd.util.checks import ConfigError

    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    wl = workloads.build("mnist1d_mlp", num_samples=1000)
    assert (wl.train_size, wl.validation_size, wl.test_size) == (720, 80, 200)
    # The same examples for every run seed, disjoint from every rank's shard of every epoch.
    kept, held = workloads.validation_split(800, 0.1)
    assert len(set(kept.tolist()) | set(held.tolist())) == 800 and not set(kept.tolist()) & set(held.tolist())
    assert torch.equal(held, workloads.validation_split(800, 0.1)[1])
    x_train, _, x_val, *_ = wl._on("cpu")
    train_rows = {tuple(r) for r in x_train.tolist()}
    assert not train_rows & {tuple(r) for r in x_val.tolist()}
    for epoch in (0, 1):
        for rank in (0, 1):
            for batch in wl.train_batches(rank, 2, 40, epoch, seed=3, device="cpu"):
                assert {tuple(r) for r in batch["x"].tolist()} <= train_rows
    model = wl.make_model(0)
    val, test = wl.evaluate(model, "cpu", "validation"), wl.evaluate(model, "cpu")
    assert val != test and val == wl.evaluate(model, "cpu", "validation")
    with pytest.raises(ValueError, match=r"split must be one of \['validation', 'test'\], got 'train'"):
        wl.evaluate(model, "cpu", "train")
    none = workloads.build("mnist1d_mlp", num_samples=1000, validation_fraction=0.0)
    assert (none.train_size, none.validation_size) == (800, 0)
    with pytest.raises(ValueError, match="holds out no validation split"):
        workloads.evaluate(none, model, "cpu", "validation")
    with pytest.raises(ConfigError, match=r"workload\.validation_fraction must be a number in \[0, 0\.5\]"):
        workloads.build("mnist1d_mlp", num_samples=1000, validation_fraction=0.9)
