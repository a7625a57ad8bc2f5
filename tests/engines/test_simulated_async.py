"""Simulated asynchrony: replicas of unequal speeds reach the parameter server in the order of
their virtual finish times, which equals K separate models trained and pushed one event at a
time in that order (also when SSP holds the fast ones back); both staleness bounds hold;
speeds and their errors."""

from __future__ import annotations

import heapq
import json
from typing import Any

import pytest
import torch

from localsgd import algorithms as A
from localsgd import workloads
from localsgd.algorithms.async_server import ParameterServer, ServerOptions
from localsgd.engines.simulated.asynchrony import COMPUTE, READY, EventLoop, SimulatedOptions, plan
from localsgd.run.config import run_config
from localsgd.run.training import train
from localsgd.util.checks import ConfigError

pytestmark = pytest.mark.timeout(600)

WORKLOAD = {"name": "mnist1d_mlp", "num_samples": 1000}
SPEEDS = [2.0, 1.0, 1.0, 0.5]


def config(asynchronous: dict[str, Any], speeds: list[float] | None = None, **changes: Any) -> Any:
    data: dict[str, Any] = {
        "workload": WORKLOAD,
        "workers": 4,
        "engine": "simulated",
        "engine_options": {"worker_speeds": speeds} if speeds else {},
        "seed": 5,
        "algorithm": {"name": "async_local_sgd", **asynchronous},
        "data": {"batch_size": 8},
        "optimizer": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
        "train": {"epochs": 1, "max_steps": 10, "eval_every": 4},
    }
    data.update(changes)
    return run_config(data)


def reference(
    cfg: Any, speeds: list[float], totals: list[int] | None = None
) -> tuple[ParameterServer, list[float]]:
    """K separate models, each with its own SGD, trained round by round in the order the
    rounds end in virtual time, each pushed to the server as its round ends; a worker the
    server holds starts its next round when the server lets it go on; worker k takes
    ``totals[k]`` steps (default: the run's steps each)."""
    workload = workloads.build(cfg.workload)
    algo = cfg.algorithm_config(1)
    k_workers, period = cfg.workers, algo.period
    totals = totals or [cfg.train.max_steps] * k_workers
    torch.manual_seed(cfg.seed)
    models = [workload.make_model(cfg.seed) for _ in range(k_workers)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [
        torch.optim.SGD(m.parameters(), lr=cfg.optimizer.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
        for m in models
    ]

    def stream(k: int) -> Any:
        epoch = 0
        while True:
            yield from workload.train_batches(
                k, k_workers, cfg.data.batch_size, epoch, cfg.seed, torch.device("cpu")
            )
            epoch += 1

    streams = [stream(k) for k in range(k_workers)]
    params = [[p for p in m.parameters()] for m in models]
    server = ParameterServer([p.detach() for p in params[0]], k_workers, algo.server_options())
    done = [0] * k_workers
    events = [(min(period, totals[k]) / speeds[k], k) for k in range(k_workers)]
    heapq.heapify(events)
    finished_at = [0.0] * k_workers
    waiting: set[int] = set()
    while events:
        now, k = heapq.heappop(events)
        steps = min(period, totals[k] - done[k])
        for _ in range(steps):
            opts[k].zero_grad()
            workload.loss(models[k], next(streams[k])).backward()
            opts[k].step()
        done[k] += steps
        server.push(k, params[k])
        waiting.add(k)
        released = True
        while released:  # a finish may let others go on
            released = False
            for j in sorted(waiting):
                if not server.ready(j):
                    continue
                released = True
                waiting.discard(j)
                server.model(params[j], j)
                if done[j] < totals[j]:
                    heapq.heappush(events, (now + min(period, totals[j] - done[j]) / speeds[j], j))
                else:
                    server.finish(j)
                    finished_at[j] = now
    assert not waiting
    return server, finished_at


def test_unequal_speeds_equal_separate_models_pushed_in_virtual_time_order(tmp_path):
    cfg = config({"period": 3}, SPEEDS)
    status = train(cfg, tmp_path, 0, 1)
    server, finished_at = reference(cfg, SPEEDS)
    model = torch.load(tmp_path / "checkpoint.pt")["model"]
    ours = torch.cat([v.reshape(-1) for v in model.values()])
    theirs = torch.cat([t.reshape(-1) for t in server.global_model])
    err = float((ours - theirs).norm() / theirs.norm())
    assert err <= 1e-5, err
    assert status.details["server"] == server.summary()
    assert status.details["virtual_time"] == max(finished_at) == 10 / 0.5
    # Every worker took its 10 steps, whatever its speed.
    assert status.details["server"]["pushes_per_worker"] == [4, 4, 4, 4]
    assert status.steps == 10 and status.final.step == 10
    # Rounds of 3 steps: the fast worker's end at 1.5, 3, 4.5, 5 (its short last one), the
    # two of speed 1 at 3, 6, 9, 10, the slow one's at 6, 12, 18, 20. At t = 3 the fast worker
    # pushes first (tie by index) from the model its own first push made; the next two have
    # missed both of its pushes, and the one after them.
    order = [(a.worker, a.staleness) for a in server.log]
    assert order[:5] == [(0, 0), (0, 0), (1, 2), (2, 3), (0, 2)]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10 and rows[-1]["updates"] == 16
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    # The train loss is replica 0's over its own steps: none once it has finished (at t = 5).
    losses = [r["train_loss"] for r in rows]
    own = [v for v in losses if v is not None]
    assert losses[-1] is None and len(own) >= 2 and all(v > 0.1 for v in own), losses
    assert status.counters.steps == 10


def test_workers_stepping_by_speed_train_for_the_same_virtual_time(tmp_path):
    # 40 steps in all shared 2 : 1 : 1 : 0.5 by largest remainders (17.8, 8.9, 8.9, 4.4).
    options = SimulatedOptions(worker_speeds=tuple(SPEEDS), steps="by_speed")
    assert options.totals(SPEEDS, 10) == [18, 9, 9, 4]
    assert options.totals([1.0] * 4, 10) == [10] * 4
    assert sum(options.totals([3.0, 1.0, 1.0], 7)) == 21
    assert options.totals([100.0, 1.0], 1) == [1, 1]  # at least one step each
    cfg = config({"period": 3}, SPEEDS, engine_options={"worker_speeds": SPEEDS, "steps": "by_speed"})
    status = train(cfg, tmp_path, 0, 1)
    server, finished_at = reference(cfg, SPEEDS, [18, 9, 9, 4])
    model = torch.load(tmp_path / "checkpoint.pt")["model"]
    ours = torch.cat([v.reshape(-1) for v in model.values()])
    theirs = torch.cat([t.reshape(-1) for t in server.global_model])
    assert float((ours - theirs).norm() / theirs.norm()) <= 1e-5
    assert status.details["server"] == server.summary()
    assert status.details["server"]["pushes_per_worker"] == [6, 3, 3, 2]
    # Everyone is done by t = 9 (the slow worker at 8), against 20 with equal steps.
    assert status.details["virtual_time"] == max(finished_at) == 9.0
    assert sorted(finished_at) == [8.0, 9.0, 9.0, 9.0]
    assert status.steps == 10  # the mean steps per worker: the run's


def test_the_schedule_steps_only_the_workers_whose_rounds_are_due():
    server = ParameterServer([], 4, A.AsyncLocalSGD(period=3).server_options())
    batches = plan(SPEEDS, 3, [10] * 4, server)
    assert [sorted(b.lengths) for b in batches[:3]] == [[0, 1, 2, 3], [0], [0, 1, 2]]
    assert sum(sum(b.lengths.values()) for b in batches) == 40
    equal = plan([1.0] * 4, 3, [10] * 4, ParameterServer([], 4, A.AsyncLocalSGD(period=3).server_options()))
    assert [b.lengths for b in equal] == [{k: n for k in range(4)} for n in (3, 3, 3, 1)]


@pytest.mark.parametrize("mode,bound", [("push_staleness", 0), ("push_staleness", 1), ("ssp", 0), ("ssp", 1)])
def test_the_staleness_bound_holds_for_unequal_speeds(tmp_path, mode, bound):
    status = train(
        config(
            {"period": 1, "max_staleness": bound, "staleness_mode": mode},
            None,
            engine_options={"speed_spread": 0.8},
        ),
        tmp_path,
        0,
        1,
    )
    server = status.details["server"]
    assert server["pushes"] == 40
    if mode == "push_staleness":
        assert server["max_staleness_seen"] <= bound
        if bound == 0:
            assert server["staleness"] == {"0": 40} and server["updates"] == 10
    else:
        # Every push applied by itself; the clock gap, not τ, is what is bounded.
        assert server["updates"] == 40 and server["max_clock_gap_seen"] <= bound
        if bound == 0:
            assert server["staleness"] == {"0": 10, "1": 10, "2": 10, "3": 10}
    speeds = status.details["worker_speeds"]
    assert len(set(speeds)) == 4 and sum(speeds) == pytest.approx(4.0)
    assert speeds == SimulatedOptions(speed_spread=0.8).speeds(4, 5)


def test_ssp_holds_the_fast_worker_within_s_clocks_of_the_slowest_at_every_event():
    """Speeds 4, 1, 1, 1, H = 1, 6 steps each, s = 1: worker 0 pushes at 0.25 (clock 1) and
    0.5 (clock 2, two ahead: held); the slow ones reach clock 1 at t = 1, which lets it go
    on; from then on it is held after every push until the next tick of the slow ones."""

    def schedule(options: ServerOptions) -> tuple[dict[int, list[float]], list[int], ParameterServer]:
        server = ParameterServer([], 4, options)
        loop = EventLoop([4.0, 1.0, 1.0, 1.0], 1, [6] * 4, server)
        pushes: dict[int, list[float]] = {k: [] for k in range(4)}

        def push(k: int) -> None:
            pushes[k].append(loop.time)
            # The workers computing a round until now: k's ends with this push.
            running = [j for j, state in enumerate(loop.state) if state in (COMPUTE, READY) or j == k]
            slowest = min(server.clock[j] for j in range(4) if j not in server.done)
            leads.append(max(server.clock[j] for j in running) - slowest)
            server.push(k, [])

        leads: list[int] = []
        while not loop.finished:
            loop.computed()
            loop.advance(push, lambda k: None)
        return pushes, leads, server

    pushes, leads, server = schedule(ServerOptions(max_staleness=1, staleness_mode="ssp"))
    # At every event, every worker computing a round is at most 1 clock ahead of the slowest.
    assert len(leads) == 24 and max(leads) == 1

    assert pushes[0] == [0.25, 0.5, 1.25, 2.25, 3.25, 4.25]
    assert pushes[1] == pushes[2] == pushes[3] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert len(server.log) == 24 and server.version == 24
    assert max(a.gap for a in server.log) == 1
    # The fast worker's pushes: at its push at clock c the slowest had clock >= c - 1.
    assert [a.gap for a in server.log if a.worker == 0] == [0, 1, 1, 1, 1, 1]
    unbounded, unbounded_leads, _ = schedule(ServerOptions())
    assert unbounded[0] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5] and max(unbounded_leads) == 4


def test_ssp_runs_equal_separate_models_that_wait_for_the_slowest(tmp_path):
    cfg = config(
        {"period": 2, "max_staleness": 1, "staleness_mode": "ssp", "staleness_lr": "inverse"}, SPEEDS
    )
    status = train(cfg, tmp_path, 0, 1)
    server, finished_at = reference(cfg, SPEEDS)
    model = torch.load(tmp_path / "checkpoint.pt")["model"]
    ours = torch.cat([v.reshape(-1) for v in model.values()])
    theirs = torch.cat([t.reshape(-1) for t in server.global_model])
    assert float((ours - theirs).norm() / theirs.norm()) <= 1e-5
    summary = status.details["server"]
    assert summary == server.summary()
    assert summary["pushes"] == summary["updates"] == 20 and summary["max_clock_gap_seen"] == 1
    # The fast worker (speed 2) cannot finish before the slow one (speed 0.5) has pushed
    # three of its five rounds (t = 12): it would be done at t = 5 unheld.
    assert status.details["virtual_time"] == max(finished_at) == 20.0
    assert finished_at[0] >= 12.0


def test_speed_options_are_checked():
    with pytest.raises(
        ConfigError,
        match=r"engine_options.worker_speeds has 3 values; it needs one per worker \(workers = 4\)",
    ):
        config({}, [1.0, 1.0, 1.0])
    with pytest.raises(
        ConfigError, match=r"engine_options.worker_speeds\[1\] must be a finite number > 0, got 0.0"
    ):
        config({}, [1.0, 0.0, 1.0, 1.0])
    with pytest.raises(
        ConfigError, match=r"give engine_options.worker_speeds or engine_options.speed_spread"
    ):
        config({}, None, engine_options={"worker_speeds": [1.0] * 4, "speed_spread": 0.5})
    with pytest.raises(ConfigError, match=r"optimizer.name = 'sgd' and a constant schedule"):
        config({}, SPEEDS, schedule={"name": "cosine"})
    with pytest.raises(ConfigError, match=r"engine_options.steps must be one of \['equal', 'by_speed'\]"):
        config({}, SPEEDS, engine_options={"worker_speeds": SPEEDS, "steps": "fast"})
    with pytest.raises(
        ConfigError,
        match=r"engine_options.steps = 'by_speed' needs an asynchronous algorithm \(a parameter server\); "
        r"'local_sgd' steps every worker together",
    ):
        config(
            {},
            None,
            engine_options={"speed_spread": 0.5, "steps": "by_speed"},
            algorithm={"name": "local_sgd"},
        )
    # Synchronous algorithms step together; the speeds give the virtual time only.
    config({}, SPEEDS, algorithm={"name": "local_sgd"}, schedule={"name": "cosine"})


def test_synchronous_runs_wait_for_the_slowest_worker(tmp_path):
    status = train(config({}, SPEEDS, algorithm={"name": "local_sgd", "period": 2}), tmp_path, 0, 1)
    assert status.details["virtual_time"] == 10 / 0.5 and status.details["worker_speeds"] == SPEEDS
