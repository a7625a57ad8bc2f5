"""Hand-built stores of synthetic runs: three configurations with a diverged and a failed run
(``build_store``); runs with per-scope counters for the cluster estimates
(``build_estimate_store``)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from localsgd.records import Store
from localsgd.run.config import RunConfig
from report.records import write_run

STEPS = (0, 50, 100, 150, 200)
BATCH = 64

# (algorithm table, workers, seed, status, wall seconds at the end, final accuracy)
RUNS: list[tuple[dict[str, Any], int, int, str, float, float]] = [
    ({"name": "minibatch_sgd"}, 1, 0, "completed", 100.0, 0.900),
    ({"name": "minibatch_sgd"}, 1, 1, "completed", 104.0, 0.910),
    ({"name": "minibatch_sgd"}, 1, 2, "completed", 99.0, 0.905),
    ({"name": "local_sgd", "period": 4}, 2, 0, "completed", 55.0, 0.880),
    ({"name": "local_sgd", "period": 4}, 2, 1, "completed", 57.5, 0.895),
    ({"name": "local_sgd", "period": 4}, 2, 2, "completed", 53.0, 0.870),
    ({"name": "local_sgd", "period": 4}, 2, 3, "diverged", 20.0, 0.100),
    ({"name": "slowmo", "period": 8}, 2, 0, "completed", 51.0, 0.885),
    ({"name": "slowmo", "period": 8}, 2, 1, "completed", 52.0, 0.875),
    ({"name": "slowmo", "period": 8}, 2, 2, "failed", 0.0, 0.0),
]
FAILURE = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: worker 1 lost'


def rows_of(
    algorithm: dict[str, Any], workers: int, seed: int, status: str, wall: float, acc: float
) -> list[dict[str, Any]]:
    if status == "failed":
        return []
    period = int(algorithm.get("period", 1))
    rows = []
    for i, step in enumerate(STEPS):
        frac = step / STEPS[-1]
        syncs = step // period if workers > 1 else 0
        rows.append(
            {
                "step": step,
                "epoch": step / 50,
                "samples": step * BATCH * workers,
                "wall_seconds": wall * frac,
                "lr": 0.1,
                "train_loss": 2.3 * (1 - 0.8 * frac) + 0.01 * seed if i else None,
                "test_loss": 2.3 * (1 - 0.7 * frac),
                "test_accuracy": 0.1 + (acc - 0.1) * frac**0.5,
                "bytes": syncs * 4 * 1000,
                "syncs": syncs,
                "collectives": syncs,
                "comm_seconds": 0.001 * syncs,
            }
        )
    if status == "diverged":
        rows[-1]["train_loss"] = math.inf
        rows[-2]["train_loss"] = math.nan
    return rows


def config_of(algorithm: dict[str, Any], workers: int, seed: int) -> dict[str, Any]:
    config = RunConfig(name=f"{algorithm['name']}-k{workers}-s{seed}", workers=workers, seed=seed).to_dict()
    config["algorithm"] = dict(algorithm)
    config["data"]["batch_size"] = BATCH
    return config


def run_id_of(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def build_store(root: Path) -> Store:
    store = Store(root)
    for algorithm, workers, seed, status, wall, acc in RUNS:
        config = config_of(algorithm, workers, seed)
        run_id = run_id_of(config)
        rows = rows_of(algorithm, workers, seed, status, wall, acc)
        error = "train loss is inf at step 200" if status == "diverged" else FAILURE
        assert write_run(store, run_id, config, rows, status, error) == status
    return store


# -- runs with per-scope counters, for the cluster estimates ---------------------------

PAYLOAD = 40_000  # bytes per model average (fp32, 10k parameters)

# (algorithm, workers, seed, wall seconds at the end, final accuracy, rows carry by_scope)
EST_RUNS: list[tuple[dict[str, Any], int, int, float, float, bool]] = [
    ({"name": "minibatch_sgd"}, 1, 0, 200.0, 0.90, True),
    ({"name": "minibatch_sgd"}, 1, 1, 210.0, 0.92, True),
    ({"name": "local_sgd", "period": 4}, 4, 0, 60.0, 0.88, True),
    ({"name": "local_sgd", "period": 4}, 4, 1, 64.0, 0.86, True),
    (
        {"name": "hierarchical_local_sgd", "period": 2, "block_period": 4, "block_size": 2},
        4,
        0,
        58.0,
        0.87,
        True,
    ),
    # Written before scopes were recorded: no by_scope, and no stats in status.json.
    ({"name": "local_sgd", "period": 2}, 4, 0, 70.0, 0.80, False),
]


def est_rows(
    algorithm: dict[str, Any], workers: int, seed: int, wall: float, acc: float, scoped: bool
) -> list[dict[str, Any]]:
    rows = []
    steps = [s * (4 if workers == 1 else 1) for s in STEPS]  # K=1 takes K× the steps per epoch
    for step in steps:
        frac = step / steps[-1]
        if workers == 1:
            scopes: dict[str, dict[str, float]] = {}
        elif algorithm["name"] == "hierarchical_local_sgd":
            world, block = step // 4, step // 2 - step // 4  # every 4th sync is a world one
            scopes = {
                "world": {"collectives": world, "bytes": world * PAYLOAD, "seconds": 0.002 * world},
                "block2": {"collectives": block, "bytes": block * PAYLOAD, "seconds": 0.001 * block},
            }
        else:
            n = step // algorithm["period"]
            scopes = {"world": {"collectives": n, "bytes": n * PAYLOAD, "seconds": 0.002 * n}}
        row = {
            "step": step,
            "epoch": step / 50,
            "samples": step * BATCH * workers,
            "wall_seconds": wall * frac,
            "train_loss": 1.0,
            "test_loss": 1.0,
            "lr": 0.1,
            "test_accuracy": 0.1 + (acc - 0.1) * frac**0.5 + 0.001 * seed,
            "bytes": sum(s["bytes"] for s in scopes.values()),
            "syncs": step,
            "collectives": sum(s["collectives"] for s in scopes.values()),
            "comm_seconds": sum(s["seconds"] for s in scopes.values()),
        }
        if scoped:
            row["by_scope"] = scopes
        rows.append(row)
    return rows


def build_estimate_store(root: Path) -> None:
    store = Store(root)
    for algorithm, workers, seed, wall, acc, scoped in EST_RUNS:
        config = config_of(algorithm, workers, seed)
        run_id = run_id_of(config)
        rows = est_rows(algorithm, workers, seed, wall, acc, scoped)
        counters = None
        if scoped:
            # The trainer's final stats: the last row's counters plus DataParallel's closing
            # world average on exit.
            by_scope = json.loads(json.dumps(rows[-1]["by_scope"]))
            if workers > 1:
                world = by_scope["world"]
                world["collectives"] += 1
                world["bytes"] += PAYLOAD
            counters = {
                "steps": rows[-1]["step"],
                "by_scope": by_scope,
                "collectives": sum(s["collectives"] for s in by_scope.values()),
                "bytes": sum(s["bytes"] for s in by_scope.values()),
                "comm_seconds": sum(s["seconds"] for s in by_scope.values()),
            }
        assert write_run(store, run_id, config, rows, "completed", counters=counters) == "completed"
