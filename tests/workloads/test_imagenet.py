"""ImageNet workloads on a tiny generated ImageNet-format folder of real JPEG files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from harness import run_world
from localsgd import workloads
from localsgd.run.config import run_config
from localsgd.util.checks import ConfigError
from localsgd.workloads.imagenet import ImageNetConfig, ImageNetWorkload, ResNet, data, resnet50, resnet101
from localsgd.workloads.imagenet.resnet import Bottleneck

WNIDS = ("n01440764", "n01443537", "n01484850")
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3
SMALL = {"image_size": 32, "eval_resize": 36, "loader_workers": 0}


def write_jpeg(path: Path, label: int, number: int) -> None:
    """A 50x40 (or 40x50) image whose colour says its class, with noise so JPEG has work."""
    rng = np.random.default_rng(1000 * label + number)
    shape = (40, 50, 3) if number % 2 else (50, 40, 3)
    base = np.zeros(3)
    base[label] = 200.0
    pixels = np.clip(base + rng.normal(30, 25, shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=90)


def make_folder(root: Path) -> Path:
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for number in range(count):
                write_jpeg(
                    folder / f"{wnid}_{split}_{number}.JPEG", label, number + (count if split == "val" else 0)
                )
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imagenet"))


def build(folder: Path, **options: Any) -> ImageNetWorkload:
    wl = workloads.build("imagenet_resnet50", data_path=str(folder), **{**SMALL, **options})
    assert isinstance(wl, ImageNetWorkload)
    return wl


def tiny_model(num_classes: int) -> ResNet:
    return ResNet((1, 1, 1, 1), num_classes, base=4)


def tiny(folder: Path, **options: Any) -> ImageNetWorkload:
    """The workload with a four-block ResNet of width 4: the same data path, a fast model."""
    return ImageNetWorkload(
        "imagenet_resnet50", ImageNetConfig(str(folder), **{**SMALL, **options}), tiny_model
    )


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def eval_batches(wl: ImageNetWorkload, split: str = "test") -> list[dict[str, torch.Tensor]]:
    return list(wl.eval_batches(split, "cpu"))


def same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["x"], y["x"]) and torch.equal(x["y"], y["y"]) for x, y in zip(a, b)
    )


# -- the model -------------------------------------------------------------------------------


def test_resnet_parameter_counts_and_v1_5_strides() -> None:
    assert params(resnet50()) == 25_557_032
    assert params(resnet101()) == 44_549_160
    model = resnet50(10)
    assert model.fc.out_features == 10
    first = model.stages[1][0]
    assert isinstance(first, Bottleneck)
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)  # v1.5: the 3x3 strides
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_zero_init_residual_and_he_init() -> None:
    blocks = [m for m in resnet50(10).modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16 and all(torch.all(b.bn3.weight == 0) for b in blocks)
    assert all(torch.all(b.bn2.weight == 1) for b in blocks)
    plain = [m for m in resnet50(10, zero_init_residual=False).modules() if isinstance(m, Bottleneck)]
    assert all(torch.all(b.bn3.weight == 1) for b in plain)
    conv = plain[0].conv2.weight  # fan_out = 64 * 3 * 3: std sqrt(2 / 576)
    assert float(conv.detach().std()) == pytest.approx((2 / 576) ** 0.5, rel=0.05)


# -- data, shards, splits ------------------------------------------------------------------------


def test_workload_sizes_model_and_metrics(folder: Path) -> None:
    wl = build(folder)
    assert wl.num_classes == 3 and wl.wnids == list(WNIDS)
    assert (wl.train_size, wl.validation_size, wl.test_size) == (22, 2, 9)  # round(0.1 * 24) held out
    model = wl.make_model(seed=0)
    assert model.fc.out_features == 3 and params(model) == params(resnet50(3))
    assert torch.equal(model.fc.weight, wl.make_model(seed=0).fc.weight)
    assert [m.name for m in wl.metrics] == [
        "accuracy",
        "top5_accuracy",
        "eval_loss",
    ] and wl.primary == "accuracy"
    assert wl.config["cache_size"] == 160 and wl.config["zero_init_residual"] is True
    assert (
        workloads.build("imagenet_resnet101", data_path=str(folder), **SMALL).make_model(0).fc.out_features
        == 3
    )


def test_shards_are_disjoint_cover_each_epoch_and_skip_validation(folder: Path) -> None:
    wl = build(folder)
    held = set(wl.validation_indices.tolist())
    orders = []
    for epoch in range(3):
        shards = [set(wl.train_indices(r, 2, 5, epoch, seed=4).tolist()) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == 10 and not shards[0] & shards[1]
        covered = shards[0] | shards[1]
        assert not covered & held and covered <= set(range(24))
        # 22 training images, 11 per rank, 2 batches of 5: one image per rank left each epoch.
        orders.append(wl.train_indices(0, 2, 5, epoch, seed=4).tolist())
    assert orders[0] != orders[1]
    assert wl.train_indices(0, 2, 5, 0, seed=4).tolist() == orders[0]
    # Over one epoch's full shards (batch 11: nothing dropped) every training image once.
    full = torch.cat([wl.train_indices(r, 2, 11, 0, seed=4) for r in range(2)]).tolist()
    assert sorted(full) == sorted(set(range(24)) - held)
    # The held-out images are the same whatever the seed, and a fraction of 0 holds none.
    assert build(folder, validation_fraction=0.0).validation_size == 0


def test_train_batches_are_augmented_reproducible_and_worker_independent(folder: Path) -> None:
    wl = build(folder)
    batches = list(wl.train_batches(1, 2, 5, epoch=0, seed=1, device="cpu"))
    assert len(batches) == wl.steps_per_epoch(2, 5) == 2
    x, y = batches[0]["x"], batches[0]["y"]
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    labels = wl._labels["train"][wl.train_indices(1, 2, 5, 0, seed=1)]
    assert torch.equal(torch.cat([b["y"] for b in batches]), labels)
    # The class colour survives the crop: the strongest channel (normalized) is the label's.
    assert torch.equal((x * torch.tensor(data.STD).view(1, 3, 1, 1)).mean((2, 3)).argmax(1), y)
    again = list(wl.train_batches(1, 2, 5, epoch=0, seed=1, device="cpu"))
    assert same_batches(batches, again)
    other_epoch = list(wl.train_batches(1, 2, 5, epoch=1, seed=1, device="cpu"))
    assert not torch.equal(batches[0]["x"], other_epoch[0]["x"])
    two_workers = list(build(folder, loader_workers=2).train_batches(1, 2, 5, epoch=0, seed=1, device="cpu"))
    assert same_batches(batches, two_workers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_are_the_cpu_batches_pinned_and_copied(folder: Path) -> None:
    wl = build(folder, loader_workers=1)
    cpu = list(wl.train_batches(0, 2, 5, epoch=0, seed=1, device="cpu"))
    cuda = list(wl.train_batches(0, 2, 5, epoch=0, seed=1, device="cuda"))
    assert all(b["x"].is_cuda and b["y"].is_cuda for b in cuda)
    for a, b in zip(cpu, cuda, strict=True):
        torch.testing.assert_close(a["x"], b["x"].cpu())
        assert torch.equal(a["y"], b["y"].cpu())
    model = tiny(folder).make_model(0)
    on_cpu = wl.evaluate(model, "cpu")
    assert wl.evaluate(model.cuda(), "cuda") == pytest.approx(on_cpu, rel=1e-4)


def test_crop_box_stays_inside_with_allowed_scale_and_ratio() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = data.crop_box(500, 375, generator)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        assert 0.08 * 500 * 375 * 0.95 <= w * h <= 500 * 375
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # A strip no crop of the allowed ratio fits: the centre crop of the clamped ratio.
    assert data.crop_box(400, 10, torch.Generator().manual_seed(0)) == (193, 0, 206, 10)


def test_eval_view_is_resize_then_centre_crop() -> None:
    img = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (50, 1, 3)), "RGB")
    out = data.eval_view(img, 32, 36)  # 100x50 -> 72x36; the centre 32x32 of that
    assert out.shape == (3, 32, 32)
    # Columns of the centre crop map back to the middle 44 columns of the original (29..71).
    assert 28 <= int(out[0, 0, 0]) <= 31 and 68 <= int(out[0, 0, -1]) <= 71


def test_evaluate_reports_top1_top5_and_loss(folder: Path) -> None:
    wl = tiny(folder)
    model = wl.make_model(0)
    test = wl.evaluate(model, "cpu")
    assert set(test) == {"accuracy", "top5_accuracy", "eval_loss"}
    assert test["top5_accuracy"] == 1.0  # 3 classes: every label is in the top 5
    assert 0.0 <= test["accuracy"] <= 1.0 and test["eval_loss"] > 0
    validation = wl.evaluate(model, "cpu", "validation")
    assert set(validation) == set(test)
    with pytest.raises(ValueError, match="holds out no validation split"):
        tiny(folder, validation_fraction=0.0).evaluate(model, "cpu", "validation")


def test_flat_val_with_label_file_equals_per_class_form(folder: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    shutil.copytree(folder / "train", flat / "train")
    (flat / "val").mkdir()
    lines = ["ImageId,PredictionString"]  # the header of the LOC_val_solution.csv form
    for number, path in enumerate(sorted((folder / "val").glob("*/*.JPEG"))):
        name = f"ILSVRC2012_val_{number + 1:08d}.JPEG"
        shutil.copy(path, flat / "val" / name)
        # Space- and comma-separated lines, with and without the extension.
        lines.append(
            f"{name} {path.parent.name}" if number % 2 else f"{Path(name).stem},{path.parent.name} 1 2 3 4"
        )
    labels = tmp_path / "val_labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    per_class, flat_wl = build(folder), build(flat, val_labels=str(labels))
    assert flat_wl.test_size == per_class.test_size == 9
    # The flat files sort in the per-class order (they were numbered in it): same batches.
    assert same_batches(eval_batches(per_class), eval_batches(flat_wl))


def test_cache_gives_the_batches_of_decoding_at_cache_size(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cached = build(folder, cache=str(cache), cache_size=48)
    (built,) = cache.iterdir()
    assert sorted(p.name for p in built.iterdir()) == ["test.npz", "test.u8", "train.npz", "train.u8"]
    index = np.load(built / "train.npz")
    assert index["labels"].tolist() == [c for c in range(3) for _ in range(TRAIN_PER_CLASS)]
    assert sorted(set(map(tuple, index["shapes"].tolist()))) == [(48, 60), (60, 48)]  # shorter side 48
    decoded = build(folder)
    for split in ("train", "test"):
        decoded._sources[split] = data.JpegSource(decoded._sources[split].split, shorter_side=48)  # type: ignore[union-attr]
    for split in ("test", "validation"):
        assert same_batches(eval_batches(cached, split), eval_batches(decoded, split))
    assert same_batches(
        list(cached.train_batches(0, 2, 5, 1, 3, "cpu")), list(decoded.train_batches(0, 2, 5, 1, 3, "cpu"))
    )
    # A second build reads the cache; a changed folder gets a new one.
    written = (built / "train.u8").stat().st_mtime_ns
    build(folder, cache=str(cache), cache_size=48)
    assert [p.name for p in cache.iterdir()] == [built.name] and (
        built / "train.u8"
    ).stat().st_mtime_ns == written
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    write_jpeg(changed / "train" / WNIDS[0] / "extra.JPEG", 0, 99)
    assert build(changed, cache=str(cache), cache_size=48).train_size == 23  # round(2.5) = 2 held out
    assert len(list(cache.iterdir())) == 2


# -- bad input -------------------------------------------------------------------------------


def test_bad_folders_name_the_key(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"workload.data_path is required"):
        workloads.build("imagenet_resnet50")
    with pytest.raises(ConfigError, match=r"workload.data_path '.*nowhere' is not a folder"):
        build(tmp_path / "nowhere")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(ConfigError, match=r"workload.data_path: .* holds no class folders train/<wnid>/"):
        build(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"workload.data_path '.*' has no val/ folder"):
        shutil.copytree(folder / "train", tmp_path / "noval" / "train")
        build(tmp_path / "noval")
    differ = tmp_path / "differ"
    shutil.copytree(folder, differ)
    shutil.rmtree(differ / "val" / WNIDS[2])
    with pytest.raises(
        ConfigError, match=r"train/ and val/ class folders differ \(only in train: \['n01484850'\]"
    ):
        build(differ)
    (differ / "val" / WNIDS[2]).mkdir()
    with pytest.raises(ConfigError, match=r"workload.data_path: class folder '.*n01484850' holds no images"):
        build(differ)
    (differ / "val" / WNIDS[2] / "x.JPEG").write_bytes(
        (folder / "val" / WNIDS[2]).joinpath(f"{WNIDS[2]}_val_0.JPEG").read_bytes()
    )
    (differ / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are no classes
    assert build(differ).num_classes == 3
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"workload.cache: cannot write the cache under '.*file/imagenet-"):
        build(folder, cache=str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"workload.eval_resize must be an integer in \[32, 2048\], got 16"):
        build(folder, eval_resize=16)
    with pytest.raises(
        ConfigError, match=r"workload.loader_workers must be an integer in \[0, 256\], got -1"
    ):
        build(folder, loader_workers=-1)
    with pytest.raises(ConfigError, match=r"workload.cache_size must be an integer in \[32, 1024\], got 8"):
        build(folder, cache_size=8)


def test_bad_label_files_name_the_key_and_line(folder: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    shutil.copytree(folder / "train", flat / "train")
    (flat / "val").mkdir()
    shutil.copy(next((folder / "val" / WNIDS[0]).iterdir()), flat / "val" / "a.JPEG")
    shutil.copy(next((folder / "val" / WNIDS[1]).iterdir()), flat / "val" / "b.JPEG")
    labels = tmp_path / "labels.txt"
    labels.write_text(f"a.JPEG {WNIDS[0]}\nb.JPEG\n")
    with pytest.raises(
        ConfigError, match=r"workload.val_labels: line 2 of '.*labels.txt' is not 'FILENAME WNID'"
    ):
        build(flat, val_labels=str(labels))
    labels.write_text(f"a.JPEG {WNIDS[0]}\nb.JPEG n99999999\n")
    with pytest.raises(ConfigError, match=r"line 2 .* with a wnid of train/: 'b.JPEG n99999999'"):
        build(flat, val_labels=str(labels))
    labels.write_text(f"a.JPEG {WNIDS[0]}\n")
    with pytest.raises(ConfigError, match=r"workload.val_labels '.*' has no label for 1 image.*e.g. b.JPEG"):
        build(flat, val_labels=str(labels))
    with pytest.raises(ConfigError, match=r"workload.data_path: .* holds no class folders; for a flat val/"):
        build(flat)
    with pytest.raises(ConfigError, match=r"workload.val_labels '.*missing.txt' is not a file"):
        build(flat, val_labels=str(tmp_path / "missing.txt"))


# -- a run: processes and simulated replicas agree -----------------------------------------------


class Float64(torch.nn.Module):
    """The tiny ResNet in float64: in float32 the engines' kernels round differently
    (~1e-7) and four steps of a BatchNorm net at batch 4 grow that to ~1e-3; in float64 the
    runs agree to ~1e-16."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = tiny_model(num_classes).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.double())


def tiny64(folder: str, loader_workers: int = 0) -> ImageNetWorkload:
    options = {**SMALL, "loader_workers": loader_workers}
    return ImageNetWorkload("imagenet_resnet50", ImageNetConfig(folder, **options), Float64)


def run_spec(folder: str, engine: str) -> Any:
    return run_config(
        {
            "workload": {"name": "imagenet_resnet50", "data_path": folder, **SMALL},
            "workers": 2,
            "engine": engine,
            "seed": 5,
            "algorithm": {"name": "local_sgd", "period": 2},
            "data": {"batch_size": 4},
            "optimizer": {"lr": 0.05, "momentum": 0.9},
            "train": {"epochs": 2, "eval_every": 4},
        }
    )


def run_processes(rank: int, world: int, folder: str, out: str) -> dict[str, Any] | None:
    import multiprocessing

    from localsgd.run.training import train

    # The loader processes fork from the rank, as from a rank a launcher starts (a fresh
    # interpreter: fork is the start method on Linux before Python 3.14). A harness rank
    # inherits the harness's forkserver, under which every loader (one an epoch and one an
    # evaluation) is a process of a new server that imports torch anew, seconds each.
    multiprocessing.set_start_method("fork", force=True)
    run_dir = Path(out) / "processes" if rank == 0 else None
    if run_dir is not None:
        run_dir.mkdir()
    status = train(
        run_spec(folder, "processes"), run_dir, rank, world, "gloo", workload=tiny64(folder, loader_workers=1)
    )
    if run_dir is None:
        return None
    return {"status": status, "model": torch.load(run_dir / "checkpoint.pt")["model"]}


def test_processes_and_simulated_replicas_train_the_same_model(folder: Path, tmp_path: Path) -> None:
    """The process ranks decode in a loader process each, the simulated run in its own
    process: the batches, and so the models, are the same."""
    from localsgd.run.training import train

    processes = run_world(run_processes, 2, str(folder), str(tmp_path))[0]
    run_dir = tmp_path / "simulated"
    run_dir.mkdir()
    status = train(run_spec(str(folder), "simulated"), run_dir, 0, 1, workload=tiny64(str(folder)))
    simulated = {"status": status, "model": torch.load(run_dir / "checkpoint.pt")["model"]}
    p, s = processes["status"], simulated["status"]
    assert p.status == s.status == "completed"
    assert p.steps_per_epoch == s.steps_per_epoch == 2  # 22 images / 2 workers // batch 4
    assert p.steps == s.steps == 4 and p.counters.syncs == s.counters.syncs == 2
    for key, tensor in processes["model"].items():
        other = simulated["model"][key]
        if tensor.is_floating_point():
            err = float((tensor - other).norm() / tensor.norm().clamp_min(1e-12))
            assert tensor.dtype == torch.float64 and err <= 1e-10, f"{key}: relative error {err:.2e}"
        else:
            assert torch.equal(tensor, other), key
    for final in (p.final, s.final):
        assert set(final.metrics) >= {"accuracy", "top5_accuracy", "eval_loss"}
        assert final.metrics["top5_accuracy"] == 1.0
    assert p.final.metrics == pytest.approx(s.final.metrics, rel=1e-10)
    assert os.path.isfile(tmp_path / "processes" / "metrics.jsonl")


def test_a_run_of_the_registered_resnet50_records_top1_and_top5(folder: Path, tmp_path: Path) -> None:
    """The workload built from its name alone, ResNet-50 itself, two steps of one worker."""
    from localsgd.run.training import train

    config = run_config(
        {
            "workload": {"name": "imagenet_resnet50", "data_path": str(folder), **SMALL},
            "data": {"batch_size": 4},
            "train": {"epochs": 1, "max_steps": 2, "eval_every": 2},
        }
    )
    status = train(config, tmp_path, 0, 1)
    assert status.status == "completed" and status.steps == 2
    assert set(status.final.metrics) == {"accuracy", "top5_accuracy", "eval_loss"}
    assert status.final.metrics["top5_accuracy"] == 1.0
    model = torch.load(tmp_path / "checkpoint.pt")["model"]
    assert sum(t.numel() for k, t in model.items() if "running" not in k and "tracked" not in k) == params(
        resnet50(3)
    )


def test_a_study_on_both_engines_reports_top1_and_top5(folder: Path, tmp_path: Path) -> None:
    """``localsgd study`` then ``localsgd report`` on the generated folder, as a user runs
    them: ResNet-50 on the process engine (2 worker processes) and the simulated engine."""
    study = tmp_path / "imagenet_tiny.toml"
    study.write_text(
        f"""
[study]
name = "imagenet_tiny"

[base]
workers = 2
algorithm = {{ name = "local_sgd", period = 2 }}

[base.workload]
name = "imagenet_resnet50"
data_path = "{folder}"
image_size = {SMALL["image_size"]}
eval_resize = {SMALL["eval_resize"]}
loader_workers = 0

[base.data]
batch_size = 4

[base.train]
epochs = 1
max_steps = 2
eval_every = 2

[[grid]]
engine = ["processes", "simulated"]
"""
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "store"
    # The report's figures as PNG at a low resolution: report.md is what is read here, and
    # the PDF and SVG copies of each figure (seconds of matplotlib) are not.
    report_args = ["report", str(out), "--format", "png", "--dpi", "50"]
    for args in (["study", str(study), "--out", str(out)], report_args):
        done = subprocess.run(
            [sys.executable, "-m", "localsgd.cli", *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
    report = (out / "report" / "report.md").read_text()
    assert "top-5" in report.lower() or "top5" in report.lower()
    runs = json.loads((out / "plan.json").read_text())["runs"]
    assert {r["engine"] for r in runs} == {"processes", "simulated"}
    for run in runs:
        status = json.loads((out / "runs" / run["run_id"] / "status.json").read_text())
        assert status["status"] == "completed"
        assert set(status["final"]["metrics"]) == {"accuracy", "top5_accuracy", "eval_loss"}
