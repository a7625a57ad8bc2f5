"""A streamed run (F = 2, τ = 1) on the simulated engine equals the same run on gloo
processes: parameters, syncs, collectives and bytes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from harness import run_world
from localsgd.run.config import run_config

pytestmark = pytest.mark.timeout(600)

# As in test_simulated.py: whole runs compared in float64, where the engines' kernels agree
# to ~1e-15 (in float32 their roundings differ by ~1e-7, and a ReLU can part the runs).
FLOAT64 = "scenarios:mnist1d_cnn_float64"
TOLERANCE = 1e-10
WORLD = 2
STREAMED = {
    "local_sgd": {"name": "local_sgd", "period": 4, "fragments": 2, "overlap": 1, "mixing": 0.5},
    "diloco": {"name": "diloco", "period": 4, "fragments": 2, "overlap": 1, "outer_lr": 0.7},
}


def config(name: str, engine: str) -> Any:
    return run_config(
        {
            "workload": {"name": FLOAT64, "num_samples": 1000},
            "workers": WORLD,
            "engine": engine,
            "seed": 3,
            "algorithm": STREAMED[name],
            "data": {"batch_size": 16},
            "optimizer": {"lr": 0.05},
            "train": {"epochs": 10, "max_steps": 22, "eval_every": 10},
        }
    )


def run_processes(rank: int, world: int, folder: str, cache: str) -> dict[str, Any]:
    os.environ["XDG_CACHE_HOME"] = cache
    from localsgd.run.training import train

    out = {}
    for name in STREAMED:
        run_dir = Path(folder) / f"proc-{name}" if rank == 0 else None
        if run_dir is not None:
            run_dir.mkdir()
        status = train(config(name, "processes"), run_dir, rank, world, "gloo")
        if rank == 0:
            assert run_dir is not None
            out[name] = {"status": status, "model": torch.load(run_dir / "checkpoint.pt")["model"]}
    return out


def test_a_streamed_run_is_the_same_on_both_engines(tmp_path, data_cache, monkeypatch):
    from localsgd.run.training import train

    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    processes = run_world(run_processes, WORLD, str(tmp_path), data_cache)[0]
    for name in STREAMED:
        run_dir = tmp_path / f"sim-{name}"
        run_dir.mkdir()
        status = train(config(name, "simulated"), run_dir, 0, 1)
        p, s = processes[name], {"status": status, "model": torch.load(run_dir / "checkpoint.pt")["model"]}
        assert p["status"].status == s["status"].status == "completed"
        assert p["status"].steps == s["status"].steps == 22
        for key in ("syncs", "collectives", "bytes"):
            assert getattr(p["status"].counters, key) == getattr(s["status"].counters, key), f"{name} {key}"
        # Fragment 1 starts at 2, 6, ..., fragment 0 at 4, 8, ...: 10 land within 22 steps.
        assert p["status"].counters.syncs >= 10, name
        for key, tensor in p["model"].items():
            other = s["model"][key]
            if tensor.is_floating_point():
                err = float((tensor - other).norm() / tensor.norm().clamp_min(1e-30))
                assert err <= TOLERANCE, f"{name} {key}: relative error {err:.2e}"
            else:
                assert torch.equal(tensor, other), f"{name} {key}"
