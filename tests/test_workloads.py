"""Workloads: registry, the sharding contract, model init, the MNIST-1D cache, evaluation,
ResNet-20, and the CIFAR-10 reader on a tiny archive in the official format."""

from __future__ import annotations

import io
import math
import os
import pickle
import random
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from localsgd import workloads
from localsgd.workloads import cifar10, mnist1d
from localsgd.workloads.base import derive_seed

NUM_SAMPLES = 1000  # -> 800 train / 200 test
N_TRAIN, N_TEST = 800, 200


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One XDG cache for the module: MNIST-1D is generated once, then read back."""
    home = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def cnn(cache_home: Path) -> workloads.Workload:
    return workloads.build("mnist1d_cnn", num_samples=NUM_SAMPLES)


@pytest.fixture(scope="module")
def arrays(cnn: workloads.Workload) -> dict[str, np.ndarray]:
    return mnist1d.load_arrays(NUM_SAMPLES, mnist1d.DEFAULT_SEED)


# -- registry ------------------------------------------------------------------------------


def test_names_and_options() -> None:
    assert workloads.names() == ["cifar10_resnet20", "mnist1d_cnn", "mnist1d_mlp"]
    assert workloads.DEFAULT == "mnist1d_cnn"
    assert workloads.options("mnist1d_cnn") == {"num_samples": 20000, "seed": 42, "data_path": None}
    assert workloads.options("cifar10_resnet20") == {"data_path": None, "num_samples": None}


def test_unknown_name_lists_allowed() -> None:
    with pytest.raises(
        ValueError, match=r"'imagenet' is unknown; allowed: \['cifar10_resnet20', 'mnist1d_cnn'"
    ):
        workloads.build("imagenet")


def test_unknown_option_lists_allowed() -> None:
    with pytest.raises(
        ValueError, match=r"no option 'batch_size'; allowed: \['data_path', 'num_samples', 'seed'\]"
    ):
        workloads.build("mnist1d_cnn", batch_size=64)


@pytest.mark.parametrize("bad", [5, 0, -1000, "1000", 1000.0, True])
def test_bad_num_samples_is_named(bad: object, cache_home: Path) -> None:
    with pytest.raises(ValueError, match=r"mnist1d_cnn\.num_samples must be an integer >= 100"):
        workloads.build("mnist1d_cnn", num_samples=bad)


def test_bad_seed_is_named(cache_home: Path) -> None:
    with pytest.raises(ValueError, match=r"mnist1d_mlp\.seed must be an integer >= 0, got -1"):
        workloads.build("mnist1d_mlp", num_samples=NUM_SAMPLES, seed=-1)


def test_sizes_and_config(cnn: workloads.Workload) -> None:
    assert (cnn.name, cnn.num_classes, cnn.train_size, cnn.test_size) == ("mnist1d_cnn", 10, N_TRAIN, N_TEST)
    assert cnn.config == {"name": "mnist1d_cnn", "num_samples": NUM_SAMPLES, "seed": 42, "data_path": None}


def test_recipes(cnn: workloads.Workload, cifar: workloads.Workload) -> None:
    assert cnn.recipe == {
        "epochs": 5,
        "batch_size": 64,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "lr_schedule": "cosine",
    }
    cnn.recipe["epochs"] = 1  # each workload holds its own copy
    assert mnist1d.CNN_RECIPE["epochs"] == 5
    assert cifar.recipe["lr_milestones"] == [82, 123] and cifar.recipe["weight_decay"] == 1e-4


# -- sharding contract ---------------------------------------------------------------------


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
    assert steps == (N_TRAIN // world_size) // batch_size == 8
    x_all = torch.as_tensor(arrays["x"], dtype=torch.float32)
    y_all = torch.as_tensor(arrays["y"])
    seen = []
    for rank in range(world_size):
        batches = list(cnn.train_batches(rank, world_size, batch_size, epoch, seed, "cpu"))
        assert len(batches) == steps
        shard = workloads.shard_indices(N_TRAIN, rank, world_size, epoch, seed)
        idx = shard[: steps * batch_size]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        assert all(b[0].shape == (batch_size, 40) and b[0].dtype == torch.float32 for b in batches)
        assert all(b[1].shape == (batch_size,) and b[1].dtype == torch.long for b in batches)
        torch.testing.assert_close(x, x_all[idx], rtol=0, atol=0)
        assert torch.equal(y, y_all[idx])
        seen.append(idx)
    assert len(torch.unique(torch.cat(seen))) == world_size * steps * batch_size


def test_train_batches_reshuffle_every_epoch(cnn: workloads.Workload) -> None:
    def first(epoch: int, seed: int) -> torch.Tensor:
        return next(iter(cnn.train_batches(0, 2, 64, epoch, seed, torch.device("cpu"))))[1]

    assert torch.equal(first(0, 0), first(0, 0))
    assert not torch.equal(first(0, 0), first(1, 0))
    assert not torch.equal(first(0, 0), first(0, 1))


def test_train_batch_errors(cnn: workloads.Workload) -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\) for world_size 2, got 2"):
        cnn.train_batches(2, 2, 32, 0, 0, "cpu")  # raised on the call, not on first next()
    with pytest.raises(ValueError, match=r"batch_size must be <= 200 \(train_size 800 // world_size 4\)"):
        cnn.steps_per_epoch(4, 201)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        cnn.steps_per_epoch(1, 0)
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0"):
        cnn.train_batches(0, 1, 32, -1, 0, "cpu")
    assert cnn.steps_per_epoch(4, 200) == 1


# -- models --------------------------------------------------------------------------------


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("name", ["mnist1d_cnn", "mnist1d_mlp"])
def test_model_init_is_a_function_of_the_seed(name: str, cache_home: Path) -> None:
    wl = workloads.build(name, num_samples=NUM_SAMPLES)
    rng = torch.get_rng_state()
    m0, m0_again, m1 = wl.make_model(0), wl.make_model(0), wl.make_model(1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert _same_params(m0, m0_again)
    assert not _same_params(m0, m1)
    assert m0.training
    x = torch.randn(5, 40)
    assert m0(x).shape == (5, 10)


def test_mnist1d_model_sizes(cache_home: Path) -> None:
    cnn = workloads.build("mnist1d_cnn", num_samples=NUM_SAMPLES).make_model(0)
    mlp = workloads.build("mnist1d_mlp", num_samples=NUM_SAMPLES).make_model(0)
    assert isinstance(cnn, mnist1d.ConvNet1D) and isinstance(mlp, mnist1d.MLP)
    # conv 1->32 (k5), 2 x conv 32->32 (k3), 3 BatchNorms, linear 160->10
    assert (
        sum(p.numel() for p in cnn.parameters())
        == 32 * 5 + 2 * 32 * 32 * 3 + 3 * 2 * 32 + 160 * 10 + 10
        == 8106
    )
    assert sum(p.numel() for p in mnist1d.ConvNet1D(batch_norm=False).parameters()) == 8106 - 3 * 32
    assert sum(p.numel() for p in mlp.parameters()) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


def test_resnet20_size_and_shape() -> None:
    model = cifar10.resnet20()
    params = list(model.parameters())
    # 19 convs + 19 BatchNorms (weight, bias) + the classifier (weight, bias); option-A
    # shortcuts have no parameters.
    assert len(params) == 19 + 2 * 19 + 2 == 59
    assert sum(p.numel() for p in params) == 269_722
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 19
    assert all(m.kernel_size == (3, 3) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# -- the MNIST-1D cache --------------------------------------------------------------------


def test_cache_is_written_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnist1d.data as generator

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list[int] = []
    real = generator.make_dataset

    def counting(args: Any) -> dict[str, Any]:
        calls.append(args.num_samples)
        return real(args)

    monkeypatch.setattr(generator, "make_dataset", counting)
    np.random.seed(123)
    random.seed(123)
    first = workloads.build("mnist1d_mlp", num_samples=500, seed=3)
    assert calls == [500]
    # make_dataset reseeds the global RNGs; the caller gets its streams back.
    assert np.random.rand() == np.random.RandomState(123).rand()
    assert random.random() == random.Random(123).random()
    path = tmp_path / "localsgd" / "mnist1d_n500_seed3.npz"
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    with np.load(path) as f:
        assert sorted(f.files) == ["x", "x_test", "y", "y_test"] and f["x"].shape == (400, 40)

    second = workloads.build("mnist1d_cnn", num_samples=500, seed=3)
    assert calls == [500]  # read from the cache, not generated again
    b1 = next(iter(first.train_batches(0, 1, 400, 0, 0, "cpu")))
    b2 = next(iter(second.train_batches(0, 1, 400, 0, 0, "cpu")))
    assert torch.equal(b1[0], b2[0]) and torch.equal(b1[1], b2[1])

    workloads.build("mnist1d_cnn", num_samples=500, seed=4)  # another seed is another file
    assert calls == [500, 500]
    assert (tmp_path / "localsgd" / "mnist1d_n500_seed4.npz").is_file()


def test_data_path_is_the_cache_directory(tmp_path: Path, cache_home: Path) -> None:
    wl = workloads.build("mnist1d_cnn", num_samples=NUM_SAMPLES, data_path=tmp_path / "mine")
    assert (tmp_path / "mine" / f"mnist1d_n{NUM_SAMPLES}_seed42.npz").is_file()
    assert wl.config["data_path"] == str(tmp_path / "mine")


def test_unreadable_cache_is_regenerated(tmp_path: Path) -> None:
    path = mnist1d.cache_path(200, 0, tmp_path)
    path.write_bytes(b"not a zip file")
    arrays = mnist1d.load_arrays(200, 0, tmp_path)
    assert arrays["x"].shape == (160, 40)
    with np.load(path) as f:
        assert np.array_equal(f["y_test"], arrays["y_test"])


def test_importing_workloads_does_not_import_generators() -> None:
    code = (
        "import sys, localsgd; assert 'localsgd.workloads' not in sys.modules;"
        "import localsgd.workloads; bad = {'mnist1d', 'matplotlib', 'torchvision'} & set(sys.modules);"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- evaluation ----------------------------------------------------------------------------


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
    metrics = cnn.evaluate(model, "cpu", batch_size=64)
    assert set(metrics) == {"test_loss", "test_accuracy"}
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(y == 0)))
    assert 0.0 < metrics["test_accuracy"] < 0.3
    assert metrics["test_loss"] == pytest.approx(want_loss, rel=1e-6)
    assert model.modes == [False] * math.ceil(N_TEST / 64)  # eval mode, every test sample
    assert model.training  # train mode restored
    model.eval()
    cnn.evaluate(model, "cpu")
    assert not model.training  # ... and eval mode kept


@pytest.fixture
def one_thread() -> Iterator[None]:
    # A tiny model on a busy 2-core machine trains many times faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_evaluate_untrained_and_trained_cnn(cnn: workloads.Workload) -> None:
    model = cnn.make_model(0)
    before = cnn.evaluate(model, "cpu")
    small_batches = cnn.evaluate(model, "cpu", batch_size=7)  # batching does not matter
    assert small_batches["test_accuracy"] == before["test_accuracy"]
    assert small_batches["test_loss"] == pytest.approx(before["test_loss"], rel=1e-6)
    assert 0.0 <= before["test_accuracy"] <= 0.3 and before["test_loss"] == pytest.approx(
        math.log(10), abs=0.2
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for epoch in range(8):
        for x, y in cnn.train_batches(0, 1, 32, epoch, 0, "cpu"):
            opt.zero_grad()
            cnn.loss(model(x), y).backward()
            opt.step()
    after = cnn.evaluate(model, "cpu")
    # 800 samples are few for MNIST-1D (~60% here), but far above chance (10%).
    assert after["test_accuracy"] > 0.45 and after["test_loss"] < 0.8 * before["test_loss"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_cnn_recipe_reaches_95_percent_on_20000_samples() -> None:
    """The measured default: one worker, 5 epochs, cosine learning rate (~3 s of training
    plus ~6-10 s to generate the data the first time)."""
    wl = workloads.build("mnist1d_cnn")
    r = wl.recipe
    model = wl.make_model(0)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=r["lr"],
        momentum=r["momentum"],
        nesterov=r["nesterov"],
        weight_decay=r["weight_decay"],
    )
    total = wl.steps_per_epoch(1, r["batch_size"]) * r["epochs"]
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    for epoch in range(r["epochs"]):
        for x, y in wl.train_batches(0, 1, r["batch_size"], epoch, 0, "cpu"):
            opt.zero_grad()
            wl.loss(model(x), y).backward()
            opt.step()
            schedule.step()
    assert wl.evaluate(model, "cpu")["test_accuracy"] >= 0.95


def test_loss_is_mean_cross_entropy(cnn: workloads.Workload) -> None:
    logits = torch.tensor([[0.0, math.log(3.0)] + [-math.inf] * 8, [0.0] * 10])
    y = torch.tensor([1, 4])
    assert cnn.loss(logits, y).item() == pytest.approx((-math.log(3 / 4) + math.log(10)) / 2)


# -- CIFAR-10 ------------------------------------------------------------------------------

PER_BATCH = 20


def _images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _batch(seed: int, protocol: int = 2) -> bytes:
    images = _images(seed, PER_BATCH)
    labels = [(seed + i) % 10 for i in range(PER_BATCH)]
    content = {
        b"batch_label": b"batch",
        b"labels": labels,
        b"data": images.reshape(PER_BATCH, 3072),
        b"filenames": [b"img%d.png" % i for i in range(PER_BATCH)],
    }
    return pickle.dumps(content, protocol=protocol)


BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _files(protocol: int = 2) -> dict[str, bytes]:
    files = {name: _batch(seed, protocol) for seed, name in enumerate(BATCH_FILES)}
    files["batches.meta"] = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2)
    return files


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


@pytest.fixture(scope="module")
def cifar_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tar(tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz", _files())


@pytest.fixture(scope="module")
def cifar(cifar_tar: Path) -> workloads.Workload:
    return workloads.build("cifar10_resnet20", data_path=cifar_tar)


def test_cifar_arrays_and_labels(cifar_tar: Path) -> None:
    arrays = cifar10.load_arrays(cifar_tar)
    assert arrays["x"].shape == (5 * PER_BATCH, 3, 32, 32) and arrays["x"].dtype == np.uint8
    assert arrays["x_test"].shape == (PER_BATCH, 3, 32, 32)
    assert np.array_equal(arrays["x"][:PER_BATCH], _images(0, PER_BATCH))  # channel-major rows
    assert np.array_equal(arrays["x"][4 * PER_BATCH :], _images(4, PER_BATCH))
    assert np.array_equal(arrays["x_test"], _images(5, PER_BATCH))
    assert arrays["y"].tolist() == [(s + i) % 10 for s in range(5) for i in range(PER_BATCH)]
    assert arrays["y_test"].tolist() == [(5 + i) % 10 for i in range(PER_BATCH)]


def test_cifar_archive_and_folder_forms_agree(cifar_tar: Path, tmp_path: Path) -> None:
    reference = cifar10.load_arrays(cifar_tar)
    folder = _folder(tmp_path / "extracted", _files(protocol=pickle.HIGHEST_PROTOCOL))
    (tmp_path / "holds_archive").mkdir()
    (tmp_path / "holds_archive" / "cifar-10-python.tar.gz").write_bytes(cifar_tar.read_bytes())
    for path in (folder, folder.parent, tmp_path / "holds_archive", str(cifar_tar)):
        arrays = cifar10.load_arrays(path)
        for key, value in reference.items():
            assert np.array_equal(arrays[key], value), (path, key)


def test_cifar_workload_sizes(cifar: workloads.Workload, cifar_tar: Path) -> None:
    assert (cifar.name, cifar.num_classes, cifar.train_size, cifar.test_size) == (
        "cifar10_resnet20",
        10,
        100,
        20,
    )
    assert cifar.config == {"name": "cifar10_resnet20", "data_path": str(cifar_tar), "num_samples": None}
    subset = workloads.build("cifar10_resnet20", data_path=cifar_tar, num_samples=30)
    assert subset.train_size == 30 and subset.test_size == 20
    with pytest.raises(ValueError, match=r"cifar10_resnet20\.num_samples must be <= 100"):
        workloads.build("cifar10_resnet20", data_path=cifar_tar, num_samples=101)


def test_normalize_per_channel() -> None:
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[0, 0] = 255
    out = cifar10.normalize(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out[0, :, 0, 0], torch.tensor([(1 - 0.4914) / 0.2470, -0.4822 / 0.2435, -0.4465 / 0.2616])
    )


def test_cifar_evaluation_sees_normalized_test_images(cifar: workloads.Workload) -> None:
    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inputs: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.inputs.append(x)
            return torch.zeros(len(x), 10)

    recorder = Recorder()
    metrics = cifar.evaluate(recorder, "cpu", batch_size=8)
    seen = torch.cat(recorder.inputs)
    torch.testing.assert_close(seen, cifar10.normalize(torch.from_numpy(_images(5, PER_BATCH))))
    assert metrics["test_loss"] == pytest.approx(math.log(10))
    assert metrics["test_accuracy"] == pytest.approx(2 / PER_BATCH)  # labels 5..24 mod 10: two zeros


def _find_crop(image: torch.Tensor, original: torch.Tensor) -> tuple[int, int, bool] | None:
    padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy : dy + 32, dx : dx + 32]
            for flip in (False, True):
                if torch.equal(image, crop.flip(2) if flip else crop):
                    return dy, dx, flip
    return None


def test_augment_is_a_padded_crop_and_flip() -> None:
    x = torch.from_numpy(_images(9, 64))
    out = cifar10.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    found = [_find_crop(out[i], x[i]) for i in range(len(x))]
    assert all(f is not None for f in found)
    offsets = {(f[0], f[1]) for f in found if f is not None}
    flips = sum(f[2] for f in found if f is not None)
    assert len(offsets) > 20 and 16 <= flips <= 48  # varied, not a fixed crop
    assert any(f[:2] != (4, 4) for f in found if f is not None)
    # Where a crop reaches into the padding, the image shows zeros (black, before normalizing).
    assert any(f[0] < 4 for f in found if f is not None)
    for image, f in zip(out, found):
        assert f is not None
        assert bool((image[:, : max(4 - f[0], 0)] == 0).all())


def test_cifar_train_batches_are_augmented_shards(cifar: workloads.Workload, cifar_tar: Path) -> None:
    arrays = cifar10.load_arrays(cifar_tar)
    x_all, y_all = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    mean = torch.tensor(cifar10.MEAN).view(3, 1, 1)
    std = torch.tensor(cifar10.STD).view(3, 1, 1)
    batches = list(cifar.train_batches(1, 2, 16, epoch=0, seed=3, device="cpu"))
    assert len(batches) == cifar.steps_per_epoch(2, 16) == 3
    idx = workloads.shard_indices(100, 1, 2, epoch=0, seed=3)[:48]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (48, 3, 32, 32)
    assert torch.equal(torch.cat([b[1] for b in batches]), y_all[idx])
    pixels = ((x * std + mean) * 255).round().to(torch.uint8)  # undo the normalization
    assert all(_find_crop(pixels[i], x_all[idx[i]]) is not None for i in range(48))
    again = torch.cat([b[0] for b in cifar.train_batches(1, 2, 16, epoch=0, seed=3, device="cpu")])
    assert torch.equal(x, again)  # augmentation seeded by (seed, epoch, rank)


def test_cifar_model_init(cifar: workloads.Workload) -> None:
    assert _same_params(cifar.make_model(3), cifar.make_model(3))
    assert not _same_params(cifar.make_model(3), cifar.make_model(4))


def test_cifar_missing_data_path() -> None:
    with pytest.raises(
        ValueError, match=r"cifar10_resnet20\.data_path must be the path of cifar-10-python\.tar\.gz"
    ):
        workloads.build("cifar10_resnet20")


def test_cifar_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"data_path '.*nowhere' does not exist; expected the python-version archive"
    ):
        workloads.build("cifar10_resnet20", data_path=tmp_path / "nowhere")


def test_cifar_missing_batch(tmp_path: Path) -> None:
    files = _files()
    del files["data_batch_3"]
    archive = _tar(tmp_path / "partial.tar.gz", files)
    with pytest.raises(
        ValueError, match=r"has no cifar-10-batches-py/data_batch_3; expected the python-version"
    ):
        workloads.build("cifar10_resnet20", data_path=archive)
    del files["test_batch"]
    folder = _folder(tmp_path / "x", files)
    with pytest.raises(ValueError, match=r"has no cifar-10-batches-py/data_batch_3"):
        workloads.build("cifar10_resnet20", data_path=folder)
    with pytest.raises(ValueError, match=r"'.*empty' has no cifar-10-batches-py/data_batch_1"):
        (tmp_path / "empty").mkdir()
        workloads.build("cifar10_resnet20", data_path=tmp_path / "empty")


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x02garbage", r"data_batch_2 in '.*' is not a readable CIFAR-10 batch pickle"),
        (pickle.dumps([1, 2, 3]), r"data_batch_2 in '.*' is malformed: expected a dict with b'data'"),
        (
            pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}),
            r"is malformed.*3 labels",
        ),
        (
            pickle.dumps({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]}),
            r"is malformed.*\(3, 1024\)",
        ),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), r"is malformed"),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
            r"is malformed.*float32",
        ),
        (pickle.dumps({b"data": _Evil(), b"labels": []}), r"refusing to load global (posix|nt|os)\.system"),
    ],
)
def test_cifar_corrupt_batch(tmp_path: Path, content: bytes, message: str) -> None:
    files = _files()
    files["data_batch_2"] = content
    with pytest.raises(ValueError, match=message):
        workloads.build("cifar10_resnet20", data_path=_tar(tmp_path / "bad.tar.gz", files))


def test_cifar_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(
        ValueError, match=r"is not a readable tar archive .*; expected the python-version archive"
    ):
        workloads.build("cifar10_resnet20", data_path=path)
