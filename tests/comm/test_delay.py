"""Injected communication delay (``comm.delay``): waited out per counted collective of its
scope on real gloo process groups, recorded by the simulated engine, and added by the cost
model's estimates as delay × collectives of the scope."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from harness import run_world
from localsgd.comm.base import WORLD, Block
from localsgd.costmodel import Cluster, Link, estimate_run
from localsgd.run.config import run_config
from localsgd.util.checks import ConfigError

pytestmark = pytest.mark.timeout(300)

DELAY = 0.3


def delayed_collectives(rank: int, world: int) -> dict[str, Any]:
    from localsgd.comm.process_group import ProcessGroupCommunicator

    comm = ProcessGroupCommunicator(delay={"world": DELAY})
    comm.prepare(Block(2))
    x = torch.full((1000,), float(rank))
    start = time.perf_counter()
    comm.average([x], WORLD)
    world_wall = time.perf_counter() - start
    start = time.perf_counter()
    comm.average([x], Block(2))  # no delay for this scope
    comm.average([x], WORLD, record=False)  # bookkeeping traffic: neither counted nor delayed
    other_wall = time.perf_counter() - start
    return {"stats": comm.stats.as_dict(), "world_wall": world_wall, "other_wall": other_wall, "x": x}


def test_process_group_waits_out_the_delay_of_each_counted_collective_of_its_scope() -> None:
    # A block of 2 in a world of 2 spans the world, but it is another scope: not delayed.
    results = run_world(delayed_collectives, 2)
    for r in results:
        scopes = r["stats"]["by_scope"]
        assert scopes["world"]["collectives"] == 1 and scopes["block2"]["collectives"] == 1
        # The wait is inside the collective's measured seconds and in the caller's wall time.
        assert scopes["world"]["seconds"] >= DELAY and r["world_wall"] >= DELAY
        assert scopes["block2"]["seconds"] < DELAY and r["other_wall"] < DELAY
        assert torch.allclose(r["x"], torch.full((1000,), 0.5))


def test_the_delay_is_validated_where_the_communicator_is_built() -> None:
    from localsgd.comm.process_group import ProcessGroupCommunicator

    with pytest.raises(RuntimeError, match="not initialized"):
        ProcessGroupCommunicator(delay={"world": 1.0})


def tiny_run(engine: str, workers: int, delay: dict[str, Any]) -> Any:
    return run_config(
        {
            "workload": {"name": "mnist1d_mlp", "num_samples": 400},
            "workers": workers,
            "engine": engine,
            "algorithm": {"name": "hierarchical_local_sgd", "period": 2, "block_period": 2, "block_size": 2},
            "data": {"batch_size": 16},
            "train": {"epochs": 2, "max_steps": 8, "eval_every": 8},
            "comm": {"delay": delay},
        }
    )


def train_delayed(rank: int, world: int, folder: str, cache: str) -> Any:
    os.environ["XDG_CACHE_HOME"] = cache
    from localsgd.run.training import train

    run_dir = Path(folder) if rank == 0 else None
    return train(tiny_run("processes", world, {"world": 0.2}), run_dir, rank, world, "gloo")


def test_a_runs_delay_reaches_the_process_engine_and_the_simulated_engine_records_it(
    tmp_path, monkeypatch, data_cache
):
    cache = data_cache
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    from localsgd.run.training import train

    (tmp_path / "s").mkdir()
    simulated = train(tiny_run("simulated", 4, {"world": 5.0}), tmp_path / "s", 0, 1)
    # Not waited out (the run takes well under the 10 s it would), but recorded.
    assert simulated.details["delay_not_waited"] == {"world": 5.0}
    assert simulated.wall_seconds < 10.0
    sim_world = simulated.counters.by_scope["world"]
    assert sim_world["collectives"] == 2 and sim_world["seconds"] < 5.0

    # The estimate adds delay × collectives of the scope to the network's time.
    cluster = Cluster("two-by-two", 2, inter=Link(1e-4, 1.25e7), intra=Link(1e-5, 1e9), allreduce="ring")
    counters = simulated.counters.by_scope
    plain = estimate_run(counters, 8, 4, 16, cluster, 0.01)
    delayed = estimate_run(counters, 8, 4, 16, cluster, 0.01, delay={"world": 5.0})
    assert delayed.comm_seconds - plain.comm_seconds == pytest.approx(2 * 5.0, rel=1e-12)

    # Two processes, one block of 2 (blocks average at steps 2 and 6, the world at 4 and 8):
    # only the world's averages wait.
    (tmp_path / "p").mkdir()
    status = run_world(train_delayed, 2, str(tmp_path / "p"), cache)[0]
    world = status.counters.by_scope["world"]
    assert world["collectives"] == 2 and status.counters.by_scope["block2"]["collectives"] == 2
    assert world["seconds"] >= 2 * 0.2 and status.wall_seconds >= 2 * 0.2
    assert status.counters.by_scope["block2"]["seconds"] < 0.2


@pytest.mark.parametrize(
    ("delay", "message"),
    [
        ({"world": -1.0}, "comm.delay.world must be a finite number >= 0 seconds, got -1.0"),
        ({"world": float("nan")}, "comm.delay.world must be a finite number >= 0 seconds"),
        ({"world": "1s"}, "comm.delay.world must be a finite number >= 0 seconds, got '1s'"),
        ({"node": 1.0}, "comm.delay.node: unknown scope 'node'; allowed: 'world' or 'block<b>'"),
        ({"block3": 1.0}, "comm.delay.block3: scope 'block3': block size 3 does not divide the 4 workers"),
        ({"block0": 1.0}, "comm.delay.block0: unknown scope 'block0'"),
    ],
)
def test_bad_delays_name_the_key(delay: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        tiny_run("processes", 4, delay)


def test_the_delay_section_round_trips_and_leaves_undelayed_run_ids_alone() -> None:
    delayed = tiny_run("processes", 4, {"world": 1, "block2": 0.5})
    assert delayed.comm.delay == {"world": 1.0, "block2": 0.5}
    assert run_config(delayed.to_dict()) == delayed
    plain = tiny_run("processes", 4, {})
    assert "comm" in plain.to_dict() and delayed.run_id() != plain.run_id()
    # The id of a run without a delay does not depend on the section existing.
    data = plain.to_dict()
    del data["comm"]
    assert run_config(data).run_id() == plain.run_id()
    with pytest.raises(ConfigError, match=r"unknown key 'comm.wait'; allowed: \['delay'\]"):
        run_config({"comm": {"wait": 1}})
