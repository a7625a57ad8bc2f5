"""The simulated engine against the process engine: same parameters, same counters."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import localsgd
from harness import run_world
from localsgd import algorithms as A
from localsgd.engines.simulated.engine import (
    ReplicaGradients,
    SimulatedCommunicator,
    StackedModel,
    check_elementwise,
    replica_span,
)
from localsgd.run.config import run_config
from scenarios import FAST, fast_spec

pytestmark = pytest.mark.timeout(600)

ALGORITHMS = {name: fast_spec(name) for name in A.names()}

# Whole runs are compared in float64: in float32 the engines' kernels round differently
# (~1e-7), and a pre-ReLU activation within that of 0 parts the runs for good (see
# scenarios.mnist1d_cnn_float64). In float64 they agree to ~1e-15, so the tolerance is tight.
FLOAT64 = "scenarios:mnist1d_cnn_float64"
TOLERANCE = 1e-10

EPOCHS = {
    # id: (K, [workload] options, steps per epoch at batch 16). 1000 samples hold 800 training
    # samples, 720 after the default validation split; fast_spec's periods are 4, 2 and 3.
    "K2": (2, {"num_samples": 1000}, 22),  # epochs end halfway through a period
    "K4-aligned": (4, {"num_samples": 1000, "validation_fraction": 0.0}, 12),  # at syncs
    "K4": (4, {"num_samples": 1000}, 11),  # inside every period
}


def xent(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def config(name: str, workers: int, engine: str, data: Mapping[str, Any]) -> Any:
    return run_config(
        {
            "workload": {"name": FLOAT64, **data},
            "workers": workers,
            "engine": engine,
            "seed": 3,
            "algorithm": ALGORITHMS[name],
            "data": {"batch_size": 16},
            "optimizer": {"lr": 0.05},
            "train": {"epochs": 10, "max_steps": 30, "eval_every": 10},
        }
    )


def run_processes(rank: int, world: int, folder: str, cache: str, data: dict[str, Any]) -> dict[str, Any]:
    os.environ["XDG_CACHE_HOME"] = cache
    from localsgd.run.training import train

    out = {}
    for name in ALGORITHMS:
        run_dir = Path(folder) / f"{name}-{world}" if rank == 0 else None
        if run_dir is not None:
            run_dir.mkdir()
        status = train(config(name, world, "processes", data), run_dir, rank, world, "gloo")
        if rank == 0:
            assert run_dir is not None
            out[name] = {"status": status, "model": torch.load(run_dir / "checkpoint.pt")["model"]}
    return out


def run_simulated(tmp_path: Path, world: int, data: dict[str, Any]) -> dict[str, Any]:
    from localsgd.run.training import train

    out = {}
    for name in ALGORITHMS:
        run_dir = tmp_path / f"sim-{name}-{world}"
        run_dir.mkdir()
        status = train(config(name, world, "simulated", data), run_dir, 0, 1)
        out[name] = {"status": status, "model": torch.load(run_dir / "checkpoint.pt")["model"]}
    return out


@pytest.fixture(scope="module")
def cache(data_cache: str) -> str:
    return data_cache


@pytest.mark.parametrize("case", list(EPOCHS))
def test_simulated_equals_processes_for_every_algorithm(case, tmp_path, cache, monkeypatch):
    """Every algorithm, 30 steps: with epochs that end at syncs, and with epochs that end
    inside a period (the default validation split), where each engine starts its next
    epoch's batches mid-period."""
    world, data, steps_per_epoch = EPOCHS[case]
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    processes = run_world(run_processes, world, str(tmp_path), cache, data)[0]
    simulated = run_simulated(tmp_path, world, data)
    for name in ALGORITHMS:
        p, s = processes[name], simulated[name]
        assert p["status"].status == s["status"].status == "completed", name
        assert p["status"].steps_per_epoch == s["status"].steps_per_epoch == steps_per_epoch
        assert s["status"].details["vectorized"], s["status"].details["fallback_reason"]
        assert p["status"].engine.real_wall_time and not s["status"].engine.real_wall_time
        assert p["status"].steps == s["status"].steps == 30
        for key in ("syncs", "collectives", "bytes", "steps"):
            assert getattr(p["status"].counters, key) == getattr(s["status"].counters, key), f"{name} {key}"
        assert p["status"].counters.syncs > 0, name
        for scope, counts in p["status"].counters.by_scope.items():
            sim_counts = s["status"].counters.by_scope[scope]
            assert (counts["collectives"], counts["bytes"]) == (
                sim_counts["collectives"],
                sim_counts["bytes"],
            )
        for key, tensor in p["model"].items():
            other = s["model"][key]
            if tensor.is_floating_point():
                assert tensor.dtype == other.dtype == torch.float64, key
                err = float((tensor - other).norm() / tensor.norm().clamp_min(1e-30))
                assert err <= TOLERANCE, f"{name} {key}: relative error {err:.2e}"
            else:
                assert torch.equal(tensor, other), f"{name} {key}"
        rows_p, rows_s = p["status"].final, s["status"].final
        assert rows_p.train_loss == pytest.approx(rows_s.train_loss, rel=TOLERANCE), name
        assert rows_p.metrics == pytest.approx(rows_s.metrics, rel=TOLERANCE), name
    assert (steps_per_epoch % FAST["period"] == 0) == (case == "K4-aligned")


# -- units -------------------------------------------------------------------------------------


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_stacked_layout_is_one_storage_per_dtype_and_averages_in_blocks():
    stacked = StackedModel(tiny(), 4)
    params = list(stacked.parameters())
    span = replica_span(params, 4)
    assert span is not None and span.shape == (4, sum(p[0].numel() for p in params))
    with torch.no_grad():
        for k in range(4):
            for p in params:
                p[k].fill_(float(k))
    comm = SimulatedCommunicator(4)
    comm.prepare(localsgd.comm.Block(2))
    comm.average(params, localsgd.comm.Block(2))
    assert [float(params[0][k].detach().flatten()[0]) for k in range(4)] == [0.5, 0.5, 2.5, 2.5]
    comm.average(params)
    assert all(torch.all(p == 1.5) for p in params)
    assert comm.stats.collectives == 2
    assert comm.stats.bytes == 2 * 4 * sum(p[0].numel() for p in params)
    with pytest.raises(ValueError, match=r"block_size=3 does not divide the world size 4"):
        comm.prepare(localsgd.comm.Block(3))
    with pytest.raises(ValueError, match="stacked along a leading replica dimension of 4"):
        comm.average([torch.zeros(3)])


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_and_batchnorm_statistics_match_per_replica_autograd(fused):
    stacked = StackedModel(tiny(), 3)
    grads = ReplicaGradients(stacked, xent, fused=fused)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 8, 3, generator=g), torch.randint(0, 2, (3, 8), generator=g)
    losses = grads({"x": x, "y": y}).flatten()
    assert grads.path == ("fused" if fused else "vmap")
    ref_losses = []
    for k in range(3):
        ref = tiny()
        loss = nn.functional.cross_entropy(ref(x[k]), y[k])
        loss.backward()
        ref_losses.append(loss.item())
        if not fused:  # the fused path returns the replicas' mean loss
            assert float(losses[k]) == pytest.approx(loss.item(), rel=1e-6)
        for p, s in zip(ref.parameters(), stacked.parameters()):
            torch.testing.assert_close(s.grad[k], p.grad, rtol=1e-5, atol=1e-6)
        for b, s in zip(ref.buffers(), stacked.stacked_buffers()):
            torch.testing.assert_close(s[k], b, rtol=1e-5, atol=1e-6)
    assert float(losses.mean()) == pytest.approx(sum(ref_losses) / 3, rel=1e-6)


def test_models_vmap_cannot_handle_fall_back_to_a_loop_and_say_why(caplog):
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.lin(x)
            return out * 2 if out.sum().item() > 0 else out  # .item() is not vmap-able

    torch.manual_seed(0)
    stacked = StackedModel(DataDependent(), 2)
    bn = StackedModel(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), DataDependent()), 2)
    ReplicaGradients(bn, xent)({"x": torch.randn(2, 4, 3), "y": torch.randint(0, 2, (2, 4))})
    counts = bn.stacked_buffers()[2]
    assert counts.tolist() == [1, 1], "a failed vmap attempt must not update BatchNorm statistics twice"
    grads = ReplicaGradients(stacked, xent, fused=False)
    x, y = torch.randn(2, 4, 3), torch.randint(0, 2, (2, 4))
    with caplog.at_level("WARNING"):
        losses = grads({"x": x, "y": y}).flatten()
    assert not grads.vectorized and "item" in (grads.fallback_reason or "").lower()
    assert "looping over replicas" in caplog.text
    ref = DataDependent()
    ref.load_state_dict(stacked.module.state_dict())
    for k in range(2):
        ref.zero_grad()
        loss = nn.functional.cross_entropy(ref(x[k]), y[k])
        loss.backward()
        assert float(losses[k]) == pytest.approx(loss.item())
        torch.testing.assert_close(stacked.stacked[0].grad[k], ref.lin.weight.grad)


def test_non_elementwise_optimizers_are_refused():
    stacked = StackedModel(tiny(), 2)
    check_elementwise(torch.optim.AdamW(stacked.parameters()))
    with pytest.raises(ValueError, match=r"LBFGS is not one of \['Adagrad', 'Adam'"):
        check_elementwise(torch.optim.LBFGS(stacked.parameters()))


def test_k256_cnn_trains_in_one_process(tmp_path, monkeypatch, data_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    from localsgd.run.training import train

    cfg = run_config(
        {
            "workers": 256,
            "engine": "simulated",
            "algorithm": {"name": "local_sgd", "period": 8},
            "workload": {"name": "mnist1d_cnn", "num_samples": 20000},
            "data": {"batch_size": 8},
            "train": {"epochs": 1, "max_steps": 16, "eval_every": 8},
        }
    )
    status = train(cfg, tmp_path, 0, 1)
    assert status.status == "completed" and status.steps == 7  # 16000 // 256 // 8
    assert status.counters.syncs == 1 and status.details["vectorized"]
    assert status.counters.bytes == 4 * (8106 + 2 * 96)  # one averaging: parameters and BatchNorm statistics
    # 7 steps of 8 samples on 256 replicas, then one averaging: a little better than chance.
    assert 0.11 < status.final.metrics["accuracy"] < 0.6


def test_simulated_algorithm_api_unchanged():
    """DataParallel runs any algorithm over a StackedModel with the simulated communicator."""
    stacked = StackedModel(tiny(), 4)
    opt = torch.optim.SGD(stacked.parameters(), lr=0.1)
    grads = ReplicaGradients(stacked, xent)
    comm = SimulatedCommunicator(4)
    with localsgd.DataParallel(stacked, opt, A.LocalSGD(period=2), comm=comm, flat=False) as dp:
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            opt.zero_grad()
            grads({"x": torch.randn(4, 8, 3, generator=g), "y": torch.randint(0, 2, (4, 8), generator=g)})
            opt.step()
            w = stacked.stacked[0]
            same = all(torch.equal(w[0], w[k]) for k in range(4))
            assert same == (step % 2 == 1)
    assert dp.stats["syncs"] == 2


def test_one_simulated_replica_is_one_process(tmp_path, monkeypatch, data_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    from localsgd.run.training import train

    models = {}
    for engine in ("processes", "simulated"):
        run_dir = tmp_path / engine
        run_dir.mkdir()
        status = train(config("local_sgd", 1, engine, {"num_samples": 1000}), run_dir, 0, 1)
        assert status.status == "completed" and status.counters.collectives == 0
        models[engine] = torch.load(run_dir / "checkpoint.pt")["model"]
    for key, tensor in models["processes"].items():
        torch.testing.assert_close(models["simulated"][key], tensor, rtol=TOLERANCE, atol=0.0)
