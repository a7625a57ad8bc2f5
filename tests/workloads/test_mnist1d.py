"""MNIST-1D: options, models, the generated-data cache, accuracy of the recipe."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from localsgd import workloads
from localsgd.workloads import mnist1d
from workloads.conftest import NUM_SAMPLES, same_params


@pytest.mark.parametrize("bad", [5, 0, -1000, "1000", 1000.0, True])
def test_bad_num_samples_is_named(bad: object, cache_home: Path) -> None:
    with pytest.raises(ValueError, match=r"workload\.num_samples must be an integer"):
        workloads.build("mnist1d_cnn", num_samples=bad)


def test_bad_seed_is_named(cache_home: Path) -> None:
    with pytest.raises(ValueError, match=r"workload\.seed must be an integer in \[0, 4294967295\], got -1"):
        workloads.build("mnist1d_mlp", num_samples=NUM_SAMPLES, seed=-1)


@pytest.mark.parametrize("name", ["mnist1d_cnn", "mnist1d_mlp"])
def test_model_init_is_a_function_of_the_seed(name: str, cache_home: Path) -> None:
    wl = workloads.build(name, num_samples=NUM_SAMPLES)
    rng = torch.get_rng_state()
    m0, m0_again, m1 = wl.make_model(0), wl.make_model(0), wl.make_model(1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert same_params(m0, m0_again)
    assert not same_params(m0, m1)
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
    # The width option: a communication-heavy MLP of 5.1 M parameters.
    wide = workloads.build("mnist1d_mlp", num_samples=NUM_SAMPLES, width=2240)
    assert wide.config["width"] == 2240
    assert sum(p.numel() for p in wide.make_model(0).parameters()) == 2240**2 + 52 * 2240 + 10 == 5_134_090
    with pytest.raises(ValueError, match=r"workload\.width must be an integer in \[1, 16384\], got 0"):
        workloads.build("mnist1d_mlp", num_samples=NUM_SAMPLES, width=0)
    with pytest.raises(ValueError, match=r"unknown key 'workload\.width'"):
        workloads.build("mnist1d_cnn", num_samples=NUM_SAMPLES, width=8)


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
    b1 = next(iter(first.train_batches(0, 1, 360, 0, 0, "cpu")))
    b2 = next(iter(second.train_batches(0, 1, 360, 0, 0, "cpu")))
    assert torch.equal(b1["x"], b2["x"]) and torch.equal(b1["y"], b2["y"])

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


@pytest.mark.usefixtures("one_thread")
def test_evaluate_untrained_and_trained_cnn(cnn: workloads.Workload) -> None:
    model = cnn.make_model(0)
    before = cnn.evaluate(model, "cpu")
    cnn.eval_batch_size = 7  # type: ignore[attr-defined]
    small_batches = cnn.evaluate(model, "cpu")  # batching does not matter
    del cnn.eval_batch_size  # type: ignore[attr-defined]
    assert small_batches["accuracy"] == before["accuracy"]
    assert small_batches["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-6)
    assert 0.0 <= before["accuracy"] <= 0.3 and before["eval_loss"] == pytest.approx(math.log(10), abs=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for epoch in range(8):
        for batch in cnn.train_batches(0, 1, 32, epoch, 0, "cpu"):
            opt.zero_grad()
            cnn.loss(model, batch).backward()
            opt.step()
    after = cnn.evaluate(model, "cpu")
    # 800 samples are few for MNIST-1D (~60% here), but far above chance (10%).
    assert after["accuracy"] > 0.45 and after["eval_loss"] < 0.8 * before["eval_loss"]


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
        for batch in wl.train_batches(0, 1, r["batch_size"], epoch, 0, "cpu"):
            opt.zero_grad()
            wl.loss(model, batch).backward()
            opt.step()
            schedule.step()
    assert wl.evaluate(model, "cpu")["accuracy"] >= 0.95


def test_shallues_fully_connected_nets(cache_home: Path) -> None:
    fc = workloads.build("mnist1d_fc", num_samples=NUM_SAMPLES, model="fc-128-128-128")
    net = fc.make_model(0)
    assert isinstance(net, mnist1d.FullyConnected)
    widths = [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [128, 128, 128, 10]
    assert sum(p.numel() for p in net.parameters()) == 40 * 128 + 128 + 2 * (128 * 128 + 128) + 1290
    assert [m.out_features for m in mnist1d.FullyConnected((1024,)).modules() if isinstance(m, torch.nn.Linear)] == [
        1024,
        10,
    ]
    assert fc.config["model"] == "fc-128-128-128" and fc.recipe["momentum"] == 0.0  # plain SGD
    assert mnist1d.fc_widths("fc-2048-2048-2048") == (2048, 2048, 2048)
    for bad in ("fc", "fc-0", "mlp-128", "fc-128-x", "fc-99999"):
        with pytest.raises(ValueError, match=r"workload\.model must name a fully connected net as fc-W1-W2"):
            workloads.build("mnist1d_fc", num_samples=NUM_SAMPLES, model=bad)


def test_train_error_is_the_error_on_the_training_split(cache_home: Path) -> None:
    wl = workloads.build("mnist1d_mlp", num_samples=NUM_SAMPLES, train_error=True)
    assert [m.name for m in wl.metrics] == ["accuracy", "eval_loss", "train_error"]
    model = wl.make_model(0)
    scores = wl.evaluate(model, "cpu")
    x, y = wl._splits["cpu"][0], wl._splits["cpu"][1]  # type: ignore[attr-defined]
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).float().mean().item()
    assert scores["train_error"] == pytest.approx(wrong)
    assert "train_error" not in workloads.build("mnist1d_mlp", num_samples=NUM_SAMPLES).evaluate(model, "cpu")
