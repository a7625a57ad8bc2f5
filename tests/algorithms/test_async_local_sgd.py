"""Asynchronous local SGD on a parameter server: one worker is plain SGD exactly; the
server's rules (order, the two staleness bounds: push staleness and SSP's clock gap,
staleness-scaled pushes, delayed Nesterov); real gloo workers against the simulated engine;
a killed worker does not stop the run, nor block the others under a bound."""

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
from localsgd.algorithms.async_server import STALENESS_LR, ParameterServer, ServerOptions
from localsgd.run.config import run_config
from localsgd.util.checks import ConfigError
from scenarios import batch, flat, loss_step, make_model

# One xdist worker runs this module, so its bounded world of 4 is built once per session, not once per worker.
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("async_local_sgd")]


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
        A.AsyncLocalSGD(period=3, max_staleness=0, staleness_mode="ssp", staleness_lr="inverse"),
    ],
    ids=["asgd", "H3", "H3_s0_scaled", "H3_ssp0_inverse"],
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


def drive(server: ParameterServer, rounds: int, seed: int, workers: int, check: Any = None) -> None:
    """Workers push in a random order; a worker whose push waits does nothing until the
    server lets it go on. ``check(server, running)`` is called before every push, with the
    workers that are computing a round (neither waiting nor finished)."""
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
        if check is not None:
            check(server, free)
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
def test_bounded_push_staleness_is_never_exceeded_and_zero_is_synchronous(bound):
    for seed in range(5):
        server = ParameterServer(
            one(0.0), 4, ServerOptions(max_staleness=bound, staleness_mode="push_staleness")
        )
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


@pytest.mark.parametrize("bound", [0, 1, 2, 5])
def test_ssp_applies_every_push_and_holds_every_worker_within_s_clocks_of_the_slowest(bound):
    def within_bound(server: ParameterServer, running: list[int]) -> None:
        # A worker computes a round only while at most s clocks ahead of the slowest worker
        # that may still push (Ho et al.: clock c proceeds iff min_j c_j >= c - s).
        may_push = [j for j in range(4) if j not in server.done]
        if may_push:
            slowest = min(server.clock[j] for j in may_push)
            assert all(server.clock[k] - slowest <= bound for k in running), (server.clock, running)

    for seed in range(5):
        server = ParameterServer(one(0.0), 4, ServerOptions(max_staleness=bound, staleness_mode="ssp"))
        drive(server, 6, seed, 4, within_bound)
        # Every push applied, each as its own update.
        assert len(server.log) == 24 and server.version == 24 and {a.group for a in server.log} == {1}
        assert server.summary()["pushes_per_worker"] == [6, 6, 6, 6]
        assert max(a.gap for a in server.log) <= bound
        # What the clock bound implies for τ: each of the 3 others pushes at most 2s + 1
        # times during one round.
        assert max(a.staleness for a in server.log) <= (2 * bound + 1) * 3
        assert server.summary()["max_clock_gap_seen"] == max(a.gap for a in server.log)
        if bound == 0:
            # Lockstep rounds: nobody goes on before the round's last push, so the k-th push
            # of a round has missed the k − 1 before it in that round.
            assert {a.gap for a in server.log} == {0}
            assert server.summary()["staleness"] == {"0": 6, "1": 6, "2": 6, "3": 6}


def test_ssp_in_round_robin_order_keeps_the_cycle():
    # The worker whose turn it is has the fewest pushes, so it is never held: no deadlock.
    for bound in (0, 1, 3):
        for seed in range(10):
            server = ParameterServer(
                one(0.0), 4, ServerOptions(max_staleness=bound, staleness_mode="ssp", order="round_robin")
            )
            drive(server, 7, seed, 4)
            assert [a.worker for a in server.log] == [0, 1, 2, 3] * 7
            assert max(a.gap for a in server.log) <= min(bound, 1)


def test_ssp_blocks_the_fast_worker_until_the_slowest_catches_up_and_a_loss_frees_it():
    server = ParameterServer(one(0.0), 3, ServerOptions(max_staleness=1, staleness_mode="ssp"))
    server.push(0, one(1.0))  # clock 1, slowest 0: goes on
    assert server.ready(0) and server.version == 1
    out = one(0.0)
    assert server.model(out, 0) == 1 and float(out[0]) == 1.0
    server.push(0, one(2.0))  # clock 2: two ahead of workers 1 and 2, applied but held
    assert not server.ready(0) and server.version == 2 and float(server.global_model[0]) == 2.0
    server.push(1, one(10.0))  # τ = 2: x = 2 + (10 − 0)
    assert not server.ready(0) and server.ready(1)
    server.push(2, one(5.0))  # the slowest reaches clock 1: worker 0 goes on, from the model now
    assert server.ready(0) and server.model(out, 0) == 4 and float(out[0]) == 17.0
    assert [(a.worker, a.clock, a.gap, a.staleness) for a in server.log] == [
        (0, 0, 0, 0),
        (0, 1, 1, 0),
        (1, 0, 0, 2),
        (2, 0, 0, 3),
    ]
    server.push(0, one(18.0))  # clock 3, the others at 1: held
    server.push(1, one(11.0))  # clock 2
    assert not server.ready(0)
    server.lose(2)  # worker 2 (clock 1) is gone: the slowest is now worker 1, at clock 2
    assert server.ready(0) and server.summary()["lost_workers"] == {"2": 6}
    server.finish(1)
    server.push(0, one(0.0))  # alone now: nobody to wait for
    assert server.ready(0)


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


@pytest.mark.parametrize(
    "rule,factors,model",
    [
        # c(τ) for τ = 0, 1, 2, 3; then x after pushes of 1, 2, 3, 6 from x = 0 by workers
        # 0, 1, 2, 3 in turn, each from the initial model (so τ = 0, 1, 2, 3):
        # x ← x + c(τ)·(x_k − 0).
        ("none", [1.0, 1.0, 1.0, 1.0], [1.0, 3.0, 6.0, 12.0]),
        # Zhang et al. 2016: η/τ for τ >= 1, η at τ = 0.
        ("inverse", [1.0, 1.0, 1 / 2, 1 / 3], [1.0, 3.0, 4.5, 6.5]),
        ("inverse_plus_one", [1.0, 1 / 2, 1 / 3, 1 / 4], [1.0, 2.0, 3.0, 4.5]),
    ],
)
def test_staleness_scaled_pushes_follow_their_rules(rule, factors, model):
    assert [STALENESS_LR[rule](tau) for tau in range(4)] == factors
    server = ParameterServer(one(0.0), 4, ServerOptions(staleness_lr=rule))
    for k, value in enumerate([1.0, 2.0, 3.0, 6.0]):
        server.push(k, one(value))
        assert float(server.global_model[0]) == pytest.approx(model[k], rel=1e-15)
    assert [a.staleness for a in server.log] == [0, 1, 2, 3]


def test_the_old_boolean_keeps_its_meaning():
    assert A.AsyncLocalSGD(staleness_lr=True).staleness_lr == "inverse_plus_one"
    assert A.AsyncLocalSGD(staleness_lr=False).staleness_lr == "none"
    assert A.AsyncLocalSGD(staleness_lr=True) == A.build(
        {"name": "async_local_sgd", "staleness_lr": "inverse_plus_one"}
    )
    assert A.AsyncLocalSGD(staleness_lr=True).server_options().staleness_lr == "inverse_plus_one"


def test_outer_momentum_follows_its_formulas():
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
    with pytest.raises(
        ConfigError,
        match=r"async_local_sgd.staleness_lr must be one of \['none', 'inverse', 'inverse_plus_one'\] "
        r"\(true and false: the old spellings of 'inverse_plus_one' and 'none'\), got 'zhang'",
    ):
        A.build({"name": "async_local_sgd", "staleness_lr": "zhang"})
    with pytest.raises(
        ConfigError, match=r"async_local_sgd.staleness_lr: .*must be a string.*or.*true or false"
    ):
        A.build({"name": "async_local_sgd", "staleness_lr": 3})
    with pytest.raises(
        ConfigError,
        match=r"async_local_sgd.staleness_mode must be one of \['push_staleness', 'ssp'\], got 'bsp'",
    ):
        A.build({"name": "async_local_sgd", "max_staleness": 1, "staleness_mode": "bsp"})
    with pytest.raises(
        ConfigError,
        match=r"async_local_sgd.staleness_mode = 'ssp' needs async_local_sgd.max_staleness \(the bound s\)",
    ):
        A.build({"name": "async_local_sgd", "staleness_mode": "ssp"})


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
    from localsgd.run.training import train

    run_dir = Path(folder) if rank == 0 else None
    if run_dir is not None:
        run_dir.mkdir(exist_ok=True)
    status = train(run_config_for(world, "processes", **algorithm), run_dir, rank, world, "gloo")
    if rank == 0:
        return {"status": status, "model": torch.load(Path(folder) / "checkpoint.pt")["model"]}
    return None


def train_simulated(folder: Path, world: int, algorithm: dict[str, Any]) -> Any:
    from localsgd.run.training import train

    folder.mkdir()
    status = train(run_config_for(world, "simulated", **algorithm), folder, 0, 1)
    return {"status": status, "model": torch.load(folder / "checkpoint.pt")["model"]}


@pytest.fixture(scope="module")
def cache(data_cache: str) -> str:
    return data_cache


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
        "s0": A.AsyncLocalSGD(period=2, max_staleness=0, staleness_mode="push_staleness"),
        "s1": A.AsyncLocalSGD(period=1, max_staleness=1, staleness_mode="push_staleness"),
        "ssp0": A.AsyncLocalSGD(period=2, max_staleness=0, staleness_mode="ssp"),
        "ssp1": A.AsyncLocalSGD(period=1, max_staleness=1, staleness_mode="ssp"),
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


@pytest.fixture(scope="module")
def bounded_ranks() -> list[dict[str, Any]]:
    return run_world(bounded, 4)


def test_max_staleness_bounds_real_workers_and_zero_is_synchronous_local_sgd(bounded_ranks):
    ranks = bounded_ranks
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


def test_ssp_on_real_workers_applies_every_push_within_the_clock_bound(bounded_ranks):
    ranks = bounded_ranks
    ssp1 = ranks[0]["ssp1"]["stats"]["server"]
    assert ssp1["pushes"] == ssp1["updates"] == 80 and ssp1["pushes_per_worker"] == [20] * 4
    assert ssp1["max_clock_gap_seen"] <= 1
    # s = 0: lockstep rounds of 4 pushes, each applied by itself as it arrives; nobody goes
    # on before a round's last push, so each round's pushes missed 0, 1, 2 and 3 updates.
    ssp0 = ranks[0]["ssp0"]["stats"]["server"]
    assert ssp0["updates"] == 40 and ssp0["max_clock_gap_seen"] == 0
    assert ssp0["staleness"] == {"0": 10, "1": 10, "2": 10, "3": 10}
    for rank in ranks:  # every worker ends with the final global model
        for name in ("ssp0", "ssp1"):
            assert torch.equal(rank[name]["params"], ranks[0][name]["params"]), name


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


@pytest.mark.parametrize(
    "bound,mode",
    [(None, "push_staleness"), (1, "push_staleness"), (1, "ssp")],
    ids=["unbounded", "s1", "ssp1"],
)
def test_a_killed_worker_does_not_stop_the_run_and_is_recorded(bound, mode, tmp_path, cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    algorithm = {"period": 2, "max_staleness": bound, "staleness_mode": mode}
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
    elif mode == "ssp":
        # The others ran up to 2 clocks past the dead worker's 3 and waited there until it
        # was lost: none of their 30 pushes is missing, each its own update.
        assert server["updates"] == 33 and server["max_clock_gap_seen"] <= bound
    else:
        assert server["max_staleness_seen"] <= bound
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [8, 16, 24, 30]
    assert rows[-1]["updates"] == server["updates"]
