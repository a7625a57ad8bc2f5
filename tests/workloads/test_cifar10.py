"""CIFAR-10: the archive reader, augmentation, ResNet-20; tiny archives built in the real format."""

from __future__ import annotations

import io
import math
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from localsgd import workloads
from localsgd.workloads import cifar10, mnist1d
from workloads.conftest import same_params

N_TRAIN, N_TEST = 800, 200


def recipe_config(recipe: dict) -> dict:
    """A workload's documented recipe as run-config sections (milestones as fractions)."""
    schedule: dict = {"name": recipe["lr_schedule"]}
    if "lr_milestones" in recipe:
        schedule["milestones"] = [m / recipe["epochs"] for m in recipe["lr_milestones"]]
        schedule["gamma"] = recipe["lr_decay"]
    optimizer = {k: recipe[k] for k in ("lr", "momentum", "nesterov", "weight_decay")}
    return {
        "optimizer": optimizer,
        "schedule": schedule,
        "train": {"epochs": recipe["epochs"]},
        "data": {"batch_size": recipe["batch_size"]},
    }


def test_recipes_are_valid_run_configs_and_private_copies(
    cnn: workloads.Workload, cifar: workloads.Workload
) -> None:
    from localsgd.run.config import run_config

    for wl in (cnn, cifar):
        config = run_config(recipe_config(wl.recipe))
        assert config.optimizer.lr == wl.recipe["lr"] and config.train.epochs == wl.recipe["epochs"]
    assert run_config(recipe_config(cifar.recipe)).schedule.milestones == (0.5, 0.75)
    cnn.recipe["epochs"] = 1  # each workload holds its own copy
    assert mnist1d.CNN_RECIPE["epochs"] == 5


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
    assert (cifar.name, cifar.num_classes, cifar.train_size, cifar.validation_size, cifar.test_size) == (
        "cifar10_resnet20",
        10,
        90,
        10,
        20,
    )
    assert cifar.config == {"data_path": str(cifar_tar), "num_samples": None, "validation_fraction": 0.1}
    subset = workloads.build("cifar10_resnet20", data_path=cifar_tar, num_samples=30)
    assert (subset.train_size, subset.validation_size, subset.test_size) == (27, 3, 20)
    with pytest.raises(ValueError, match=r"workload\.num_samples must be <= 100"):
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
    cifar.eval_batch_size = 8  # type: ignore[attr-defined]
    metrics = cifar.evaluate(recorder, "cpu")
    del cifar.eval_batch_size  # type: ignore[attr-defined]
    seen = torch.cat(recorder.inputs)
    torch.testing.assert_close(seen, cifar10.normalize(torch.from_numpy(_images(5, PER_BATCH))))
    assert metrics["eval_loss"] == pytest.approx(math.log(10))
    assert metrics["accuracy"] == pytest.approx(2 / PER_BATCH)  # labels 5..24 mod 10: two zeros


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
    kept, _ = workloads.validation_split(100, 0.1)  # what is trained on: 90 of the 100
    x_all, y_all = torch.from_numpy(arrays["x"])[kept], torch.from_numpy(arrays["y"])[kept]
    mean = torch.tensor(cifar10.MEAN).view(3, 1, 1)
    std = torch.tensor(cifar10.STD).view(3, 1, 1)
    batches = list(cifar.train_batches(1, 2, 16, epoch=0, seed=3, device="cpu"))
    assert len(batches) == cifar.steps_per_epoch(2, 16) == 2
    idx = workloads.shard_indices(90, 1, 2, epoch=0, seed=3)[:32]
    x = torch.cat([b["x"] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (32, 3, 32, 32)
    assert torch.equal(torch.cat([b["y"] for b in batches]), y_all[idx])
    pixels = ((x * std + mean) * 255).round().to(torch.uint8)  # undo the normalization
    assert all(_find_crop(pixels[i], x_all[idx[i]]) is not None for i in range(32))
    again = torch.cat([b["x"] for b in cifar.train_batches(1, 2, 16, epoch=0, seed=3, device="cpu")])
    assert torch.equal(x, again)  # augmentation seeded by (seed, epoch, rank)


def test_cifar_stacked_batches_are_each_streams_augmented_batches(cifar: workloads.Workload) -> None:
    # Augmentation draws per stream (seed, epoch, rank): stacking keeps each stream's draws.
    streams = [(0, 2, 3), (1, 2, 3), (0, 2, 4)]
    got = list(workloads.stacked_train_batches(cifar, streams, 16, 1, "cpu"))
    per_stream = [list(cifar.train_batches(r, w, 16, 1, seed, "cpu")) for r, w, seed in streams]
    assert len(got) == 2
    for t, g in enumerate(got):
        assert g["x"].shape == (3, 16, 3, 32, 32)
        assert all(torch.equal(g["x"][s], per_stream[s][t]["x"]) for s in range(3))
        assert all(torch.equal(g["y"][s], per_stream[s][t]["y"]) for s in range(3))


def test_cifar_model_init(cifar: workloads.Workload) -> None:
    assert same_params(cifar.make_model(3), cifar.make_model(3))
    assert not same_params(cifar.make_model(3), cifar.make_model(4))


def test_cifar_missing_data_path() -> None:
    with pytest.raises(
        ValueError, match=r"workload\.data_path is required: the path of cifar-10-python\.tar\.gz"
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
