"""Asynchronous local SGD on a parameter server: one worker is plain SGD exactly; the
server's rules (order, bounded staleness, staleness-aware scaling, delayed Nesterov); real
gloo workers against the simulated engine; a killed worker does not stop the run."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import localsgd
from harness import run_world
from localsgd import algorithms as A
from localsgd.algorithms.async_server import ParameterServer, ServerOptions
from localsgd.studies.schema import run_config
from scenarios import batch, flat, loss_step, make_model

pytestmark = pytest.mark.timeout(600)


def plain(steps: int, momentum: float = 0.9) -> torch.Tensor:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for step in range(steps):
        loss_step(model, opt, *batch(0, step))
    return flat(model)


@pytest.mark.parametrize(
    "algo",
    [
        A.AsyncLocalSGD(period=1),
        A.AsyncLocalSGD(period=3),
        A.AsyncLocalSGD(period=3, max_staleness=0, staleness_lr=True),
    ],
    ids=["asgd", "H3", "H3_s0_scaled"],
)
def test_one_worker_is_plain_sgd_exactly(algo):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with localsgd.DataParallel(model, opt, algo) as dp:
        for step in range(40):
            loss_step(model, opt, *batch(0, step))
    assert torch.equal(flat(model), plain(40))
    server = dp.details["server"]
    assert server["updates"] == dp.stats["syncs"] == -(-40 // algo.period)
    assert server["staleness"] == {"0": server["updates"]}
    # One push and one pull per exchange, the final pull besides: 4 bytes per value each.
    numel = sum(p.numel() for p in model.parameters())
    assert dp.stats["by_scope"]["push"] == pytest.approx(
        {
            "collectives": server["updates"],
            "bytes": 4 * numel * server["updates"],
            "seconds": dp.stats["by_scope"]["push"]["seconds"],
        }
    )
    assert dp.stats["by_scope"]["pull"]["collectives"] == server["updates"] + 1


def test_a_server_step_that_is_not_the_identity_changes_the_model():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with localsgd.DataParallel(model, opt, A.AsyncLocalSGD(period=3, outer_lr=0.5)):
        for step in range(12):
            loss_step(model, opt, *batch(0, step))
    assert not torch.allclose(flat(model), plain(12))


# -- the server's rules, unit by unit -----------------------------------------------------------


def one(value: float) -> list[torch.Tensor]:
    return [torch.tensor([value], dtype=torch.float64)]


def drive(server: ParameterServer, rounds: int, seed: int, workers: int) -> None:
    """Workers push in a random order; a worker whose push waits does nothing until applied."""
    rng = random.Random(seed)
    todo = {k: rounds for k in range(workers)}
    value = {k: 0.0 for k in range(workers)}
    waiting: set[int] = set()
    finished: set[int] = set()
    while True:
        waiting = {k for k in waiting if not server.ready(k)}
        for k in range(workers):
            if not todo[k] and k not in waiting and k not in finished:
                server.finish(k)  # as a worker does right after its last push
                finished.add(k)
        free = [k for k in range(workers) if todo[k] and k not in waiting]
        if not free:
            assert not waiting, f"deadlock: workers {sorted(waiting)} wait and nobody can push"
            break
        k = rng.choice(free)
        out = one(0.0)
        server.model(out, k)
        value[k] = float(out[0]) + 1.0
        server.push(k, one(value[k]))
        todo[k] -= 1
        if not server.ready(k):
            waiting.add(k)
    assert server.finished()


@pytest.mark.parametrize("bound", [0, 1, 2, 5, None])
def test_bounded_staleness_is_never_exceeded_and_zero_is_synchronous(bound):
    for seed in range(5):
        server = ParameterServer(one(0.0), 4, ServerOptions(max_staleness=bound))
        drive(server, 6, seed, 4)
        seen = [a.staleness for a in server.log]
        assert len(seen) == 24
        if bound is not None:
            assert max(seen) <= bound
        if bound == 0:
            # Synchronous: every update is one group of all four, from the model they all had.
            assert set(seen) == {0} and server.version == 6
            assert {a.group for a in server.log} == {4}
    # Unbounded, some push sees others' updates.
    server = ParameterServer(one(0.0), 4, ServerOptions())
    drive(server, 6, 0, 4)
    assert max(a.staleness for a in server.log) > 1 and server.version == 24


def test_round_robin_applies_in_cyclic_order_whatever_the_arrival_order():
    server = ParameterServer(one(0.0), 3, ServerOptions(order="round_robin"))
    server.push(2, one(2.0))
    server.push(1, one(1.0))
    assert not server.ready(2) and not server.ready(1) and server.version == 0
    server.push(0, one(0.5))
    assert [a.worker for a in server.log] == [0, 1, 2]
    assert [a.staleness for a in server.log] == [0, 1, 2]
    # x ← x_k + (x − b_k): 0.5, then 1 + (0.5 − 0), then 2 + (1.5 − 0)
    assert float(server.global_model[0]) == 3.5


def test_staleness_scaling_and_outer_momentum_follow_their_formulas():
    server = ParameterServer(one(0.0), 2, ServerOptions(staleness_lr=True))
    server.push(0, one(1.0))  # τ = 0: x = 0 + 1·(1 − 0)
    server.push(1, one(4.0))  # τ = 1: x = 1 + ½·(4 − 0)
    assert float(server.global_model[0]) == 3.0
    beta, lr, n = 0.5, 0.8, 2
    server = ParameterServer(one(0.0), 1, ServerOptions(outer_lr=lr, outer_momentum=beta, nesterov_delay=n))
    x, m, acc = 0.0, 0.0, 0.0
    for i, pushed_change in enumerate([1.0, -2.0, 3.0, 0.5, 1.5]):
        out = one(0.0)
        server.model(out, 0)
        server.push(0, one(float(out[0]) + pushed_change))
        g = -pushed_change
        acc += g
        x -= lr * g / n
        if (i + 1) % n == 0:
            m = beta * m + acc / n
            x -= lr * beta * m
            acc = 0.0
        assert float(server.global_model[0]) == pytest.approx(x, rel=1e-12)
    nesterov = ParameterServer(one(0.0), 1, ServerOptions(outer_lr=lr, outer_momentum=beta))
    x, m = 0.0, 0.0
    for change in [1.0, -2.0, 3.0]:
        out = one(0.0)
        nesterov.model(out, 0)
        nesterov.push(0, one(float(out[0]) + change))
        m = beta * m - change
        x -= lr * (-change + beta * m)
        assert float(nesterov.global_model[0]) == pytest.approx(x, rel=1e-12)


def test_a_lost_worker_stops_bounding_the_others():
    server = ParameterServer(one(0.0), 3, ServerOptions(max_staleness=0))
    server.push(0, one(1.0))
    server.push(1, one(1.0))
    assert not server.ready(0)  # waits for worker 2's push
    server.lose(2)
    assert server.ready(0) and server.ready(1) and server.version == 1
    assert server.summary()["lost_workers"] == {"2": 0}
    with pytest.raises(ValueError, match="worker 2 is not active"):
        server.push(2, one(1.0))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"async_local_sgd.max_staleness must be an integer >= 0"):
        A.AsyncLocalSGD(max_staleness=-1)
    with pytest.raises(
        ValueError, match=r"async_local_sgd.nesterov_delay needs async_local_sgd.outer_optimizer"
    ):
        A.AsyncLocalSGD(nesterov_delay=4)
    with pytest.raises(ValueError, match=r"async_local_sgd.order must be one of"):
        A.AsyncLocalSGD(order="fifo")


# -- real workers -------------------------------------------------------------------------------


def run_config_for(workers: int, engine: str, **algorithm: Any) -> Any:
    return run_config(
        {
            "workload": {"name": "mnist1d_cnn", "num_samples": 1000},
            "workers": workers,
            "engine": engine,
            "seed": 3,
            "algorithm": {"name": "async_local_sgd", **algorithm},
            "data": {"batch_size": 16},
            "optimizer": {"lr": 0.05},
            "train": {"epochs": 10, "max_steps": 30, "eval_every": 8},
        }
    )


def train_ranks(rank: int, world: int, folder: str, cache: str, algorithm: dict[str, Any]) -> Any:
    os.environ["XDG_CACHE_HOME"] = cache
    from localsgd.studies.trainer import train

    run_dir = Path(folder) if rank == 0 else None
    if run_dir is not None:
        run_dir.mkdir(exist_ok=True)
    status = train(run_config_for(world, "processes", **algorithm), run_dir, rank, world, "gloo")
    if rank == 0:
        return {"status": status, "model": torch.load(Path(folder) / "checkpoint.pt")["model"]}
    return None


def train_simulated(folder: Path, world: int, algorithm: dict[str, Any]) -> Any:
    from localsgd.studies.trainer import train

    folder.mkdir()
    status = train(run_config_for(world, "simulated", **algorithm), folder, 0, 1)
    return {"status": status, "model": torch.load(folder / "checkpoint.pt")["model"]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("world", [2, 4], ids=lambda k: f"K{k}")
def test_round_robin_workers_equal_the_simulated_engine_and_the_final_evaluation_is_the_global_model(
    world, tmp_path, cache, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    algorithm = {
        "period": 3,
        "order": "round_robin",
        "outer_optimizer": "nesterov",
        "outer_lr": 0.4,
        "outer_momentum": 0.5,
        "staleness_lr": True,
    }
    processes = run_world(train_ranks, world, str(tmp_path / "p"), cache, algorithm)[0]
    simulated = train_simulated(tmp_path / "s", world, algorithm)
    p, s = processes["status"], simulated["status"]
    assert p.status == s.status == "completed"
    for key, tensor in processes["model"].items():
        if not tensor.is_floating_point():
            assert torch.equal(tensor, simulated["model"][key]), key
            continue
        # vmap's batched kernels round differently from one replica's: float tolerance, as
        # for every algorithm (tests/engines/test_simulated.py).
        err = float((tensor - simulated["model"][key]).norm() / tensor.norm().clamp_min(1e-12))
        assert err <= 1e-5, f"{key}: relative error {err:.2e}"
    for key in ("steps", "syncs", "collectives", "bytes"):
        assert getattr(p.counters, key) == getattr(s.counters, key), key
    assert {k: v["bytes"] for k, v in p.counters.by_scope.items()} == {
        k: v["bytes"] for k, v in s.counters.by_scope.items()
    }
    server = p.details["server"]
    assert server == s.details["server"]
    # Round robin: the first round sees 0, 1, ..., K-1 updates, every later push K-1.
    rounds = 10  # ceil(30 / 3)
    assert server["updates"] == rounds * world
    assert server["staleness"] == {
        **{str(k): 1 for k in range(world - 1)},
        str(world - 1): (rounds - 1) * world + 1,
    }
    # Evaluations every 8 steps, and the final one once, after every worker finished, of
    # the global model (the one the checkpoint holds).
    record = (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in record] == [8, 16, 24, 30]
    assert p.final.updates == server["updates"]
    assert p.final.metrics["accuracy"] == pytest.approx(s.final.metrics["accuracy"], abs=2e-3)
    from localsgd import workloads

    workload = workloads.build({"name": "mnist1d_cnn", "num_samples": 1000})
    model = workload.make_model(3)
    model.load_state_dict(processes["model"])
    assert workload.evaluate(model, torch.device("cpu")) == pytest.approx(p.final.metrics)
    assert p.final.metrics["accuracy"] > 0.2  # it learned (chance is 0.1)


def test_resuming_from_a_checkpoint_is_refused():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with localsgd.DataParallel(model, opt, A.AsyncLocalSGD(period=2)) as dp:
        loss_step(model, opt, *batch(0, 0))
        state = dp.state_dict()
        with pytest.raises(ValueError, match="async_local_sgd cannot resume from per-rank checkpoints"):
            dp.load_state_dict(state)


def bounded(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, algo in {
        "s0": A.AsyncLocalSGD(period=2, max_staleness=0),
        "s1": A.AsyncLocalSGD(period=1, max_staleness=1),
        "local": A.LocalSGD(period=2),
    }.items():
        model, stats = train(algo, rank, range(20))
        out[name] = {"params": flat(model), "stats": stats}
    return out


def train(algo: A.AlgorithmConfig, rank: int, steps: range) -> tuple[torch.nn.Module, dict[str, Any]]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with localsgd.DataParallel(model, opt, algo) as dp:
        for step in steps:
            loss_step(model, opt, *batch(rank, step))
    return model, {**dp.stats, **dp.details}


def test_max_staleness_bounds_real_workers_and_zero_is_synchronous_local_sgd():
    ranks = run_world(bounded, 4)
    server = ranks[0]["s1"]["stats"]["server"]
    assert server["pushes"] == 80 and server["max_staleness_seen"] <= 1
    s0 = ranks[0]["s0"]["stats"]["server"]
    # Every push applied to the very model it was computed from, four at a time.
    assert s0["staleness"] == {"0": 40} and s0["updates"] == 10
    for rank in ranks:
        # Each worker ends with the final global model: local SGD's average, to rounding.
        err = float(
            (rank["s0"]["params"] - ranks[0]["local"]["params"]).norm() / ranks[0]["local"]["params"].norm()
        )
        assert err < 1e-6, err
        assert torch.equal(rank["s0"]["params"], ranks[0]["s0"]["params"])


# -- a worker that dies ----------------------------------------------------------------------------

KILLED, KILL_AT = 2, 7


def train_until_killed(rank: int, world: int, folder: str, cache: str, algorithm: dict[str, Any]) -> Any:
    if rank == KILLED:
        steps = [0]

        def die(optimizer: Any, args: Any, kwargs: Any) -> None:
            steps[0] += 1
            if steps[0] == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)

        register_optimizer_step_post_hook(die)
    return train_ranks(rank, world, folder, cache, algorithm)


@pytest.mark.parametrize("bound", [None, 1], ids=["unbounded", "s1"])
def test_a_killed_worker_does_not_stop_the_run_and_is_recorded(bound, tmp_path, cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    algorithm = {"period": 2, "max_staleness": bound}
    results = run_world(train_until_killed, 3, str(tmp_path), cache, algorithm, may_die=(KILLED,))
    assert results[KILLED] is None
    status = results[0]["status"]
    assert status.status == "completed" and status.steps == 30
    server = status.details["server"]
    # It pushed after steps 2, 4, 6 and died at 7: lost, with the run going on without it.
    assert list(server["lost_workers"]) == [str(KILLED)]
    assert server["pushes_per_worker"] == [15, 15, 3]
    if bound is None:
        assert server["updates"] == 33  # every push its own update
    else:
        assert server["max_staleness_seen"] <= bound
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 16, 24, 30]
    assert rows[-1]["updates"] == server["updates"]
