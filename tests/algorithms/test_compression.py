"""Compressed averaging in the algorithms: identical ranks, bytes counted, the simulated
engine's bits equal to real process groups', exact resume, ``none`` unchanged."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import localsgd
from harness import run_world
from localsgd import algorithms as A
from localsgd.comm.codecs import Compression, payload_bytes
from localsgd.engines.simulated.engine import SimulatedCommunicator, StackedModel

pytestmark = pytest.mark.timeout(300)

STEPS = 8
INT8 = {"codec": "int8", "block": 64, "error_feedback": True}


def model() -> nn.Module:
    torch.manual_seed(0)
    # 3·97 + 97 + 97·5 + 5 = 878 parameters: blocks of 64 end in a partial one.
    return nn.Sequential(nn.Linear(3, 97), nn.Tanh(), nn.Linear(97, 5))


def numel() -> int:
    return sum(p.numel() for p in model().parameters())


def gradient(rank: int, step: int, shape: torch.Size) -> torch.Tensor:
    """Each rank's gradient at a step: a fixed function of (rank, step), so both engines
    step on the same numbers and any difference comes from the averaging."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(shape, generator=g) * (1 + rank)


def configs(world: int) -> dict[str, A.AlgorithmConfig]:
    return {
        "local_sgd": A.LocalSGD(period=2, compression=INT8),
        "post_local_sgd": A.PostLocalSGD(switch_step=2, period=2, compression=INT8),
        "hierarchical_local_sgd": A.HierarchicalLocalSGD(
            period=1, block_period=2, block_size=2 if world > 2 else 1, compression=INT8
        ),
        "slowmo": A.SlowMo(period=2, outer_momentum=0.5, compression=INT8),
        "diloco": A.DiLoCo(period=2, compression={"codec": "int4", "block": 64}),
        "diloco_topk": A.DiLoCo(period=2, compression={"codec": "topk", "ratio": 0.1}),
        "minibatch_sgd": A.MiniBatchSGD(compression={"codec": "bf16", "error_feedback": False}),
    }


def plain(config: A.AlgorithmConfig) -> A.AlgorithmConfig:
    """The same algorithm without compression."""
    return A.build({**config.to_dict(), "compression": {"codec": "none"}})


def flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def train_rank(rank: int, world: int, algo: A.AlgorithmConfig, steps: int = STEPS) -> dict[str, Any]:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    equal = []
    with localsgd.DataParallel(net, opt, algo) as dp:
        for step in range(steps):
            opt.zero_grad()
            for p in net.parameters():
                p.grad = gradient(rank, step, p.shape)
            opt.step()
            mine = flat(list(net.parameters()))
            everyone = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            equal.append(all(torch.equal(everyone[0], e) for e in everyone))
        state = copy.deepcopy(dp._sync.state_dict())  # type: ignore[union-attr]
        stats = dict(dp.stats)
    return {"params": flat(list(net.parameters())), "equal": equal, "stats": stats, "state": state}


def train_simulated(world: int, algo: A.AlgorithmConfig, steps: int = STEPS) -> dict[str, Any]:
    stacked = StackedModel(model(), world)
    opt = torch.optim.SGD(stacked.parameters(), lr=0.1, momentum=0.9)
    with localsgd.DataParallel(stacked, opt, algo, comm=SimulatedCommunicator(world), flat=False) as dp:
        for step in range(steps):
            opt.zero_grad()
            for p in stacked.parameters():
                p.grad = torch.stack([gradient(k, step, p.shape[1:]) for k in range(world)])
            opt.step()
        stats = dict(dp.stats)
    params = [torch.cat([p[k].detach().reshape(-1) for p in stacked.parameters()]) for k in range(world)]
    return {"params": params, "stats": stats}


def processes(rank: int, world: int) -> dict[str, Any]:
    out = {name: train_rank(rank, world, algo) for name, algo in configs(world).items()}
    out["none"] = {
        name: train_rank(rank, world, plain(algo))["params"] for name, algo in configs(world).items()
    }
    return out


def counts(stats: dict[str, Any]) -> dict[str, Any]:
    """What both engines count alike (seconds are each engine's own)."""
    scopes = {k: (v["collectives"], v["bytes"]) for k, v in stats["by_scope"].items()}
    return {"syncs": stats["syncs"], "collectives": stats["collectives"], "bytes": stats["bytes"], **scopes}


SYNCED = {  # steps (0-based) right after which every rank holds the same parameters
    "local_sgd": {1, 3, 5, 7},
    "post_local_sgd": {0, 1, 3, 5, 7},
    "slowmo": {1, 3, 5, 7},
    "diloco": {1, 3, 5, 7},
    "diloco_topk": {1, 3, 5, 7},
    "minibatch_sgd": set(range(STEPS)),
}


@pytest.mark.parametrize("world", [2, 4])
def test_compressed_runs_agree_on_every_rank_and_with_the_simulated_engine(world):
    ranks = run_world(processes, world)
    n = numel()
    for name, algo in configs(world).items():
        results = [r[name] for r in ranks]
        # After each sync every rank holds the same bits; between syncs they differ.
        if name in SYNCED:
            assert [i for i, e in enumerate(results[0]["equal"]) if e] == sorted(SYNCED[name]), name
        assert all(torch.equal(results[0]["params"], r["params"]) for r in results), name
        # The simulated engine stacks the replicas and produces the same bits.
        simulated = train_simulated(world, algo)
        for k in range(world):
            assert torch.equal(simulated["params"][k], results[k]["params"]), f"{name} replica {k}"
        assert counts(simulated["stats"]) == counts(results[0]["stats"]), name
        # Bytes: each sync's payload (and only that: no buffers in this model).
        compression: Compression = algo.compression  # type: ignore[attr-defined]
        per_sync = payload_bytes(compression, n)
        stats = results[0]["stats"]
        assert stats["bytes"] == stats["collectives"] * per_sync, name
        # Compression changed the run, and not by much.
        exact = ranks[0]["none"][name]
        assert not torch.equal(exact, results[0]["params"]), name
        if compression.codec != "topk":  # top-k holds 90 % of each delta back in the residual
            assert float((exact - results[0]["params"]).abs().max()) < 0.2 * float(exact.abs().max()), name
    int8 = ranks[0]["local_sgd"]["stats"]
    assert int8["bytes"] / int8["collectives"] == n + 8 * math.ceil(n / 64)


def test_bytes_per_sync_from_dp_stats_at_the_default_block():
    """int8 ≤ 0.27× and int4 ≤ 0.15× fp32's bytes per sync as dp.stats counts them (the
    engines count alike, asserted above): 878 codes + 4 blocks × 8 bytes, 439 + 32."""
    n = numel()
    sent = {}
    for codec in ("none", "int8", "int4", "fp16", "topk"):
        stats = train_simulated(4, A.LocalSGD(period=2, compression={"codec": codec}))["stats"]
        assert stats["collectives"] == STEPS // 2
        sent[codec] = stats["bytes"] / stats["collectives"]
        world = stats["by_scope"]["world"]
        if codec == "none":
            assert "gathers" not in world
        else:  # the cost model prices these as all-gathers
            assert (world["gathers"], world["gathered_bytes"]) == (world["collectives"], world["bytes"])
    assert sent == {"none": 4 * n, "int8": n + 32, "int4": 439 + 32, "fp16": 2 * n, "topk": 8 * 9}
    assert (
        sent["int8"] / sent["none"] == pytest.approx(0.2591, abs=1e-4) and sent["int8"] / sent["none"] <= 0.27
    )
    assert (
        sent["int4"] / sent["none"] == pytest.approx(0.1341, abs=1e-4) and sent["int4"] / sent["none"] <= 0.15
    )


def exact_run(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Every algorithm with ``codec = "none"``, spelled out and by default."""
    out = {}
    for name, algo in configs(world).items():
        none = plain(algo)
        default = A.build({k: v for k, v in none.to_dict().items() if k != "compression"})
        a, b = train_rank(rank, world, none), train_rank(rank, world, default)
        assert torch.equal(a["params"], b["params"]) and counts(a["stats"]) == counts(b["stats"]), name
        assert "compression" not in str(a["state"]), name
        out[name] = a["params"]
    return out


def test_codec_none_is_the_uncompressed_algorithm_on_both_engines():
    world = 2
    ranks = run_world(exact_run, world)
    for name, algo in configs(world).items():
        none = plain(algo)
        default = A.build({k: v for k, v in none.to_dict().items() if k != "compression"})
        a, b = train_simulated(world, none), train_simulated(world, default)
        for k in range(world):
            assert torch.equal(a["params"][k], b["params"][k]), name
            # float tolerance, as between the engines everywhere else: all-reduce sums in its own order
            torch.testing.assert_close(a["params"][k], ranks[k][name], rtol=1e-6, atol=1e-7)
        assert a["stats"]["bytes"] == a["stats"]["collectives"] * 4 * numel()


def resumed(rank: int, world: int) -> dict[str, Any]:
    """8 steps in one go, saving this rank's state after step 5 (mid-period: a residual and
    unsynced parameters to carry), then 3 more from that state in a fresh DataParallel
    over a differently initialised model: equal bits."""
    out = {}
    for name, algo in configs(world).items():
        net = model()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        with localsgd.DataParallel(net, opt, algo) as dp:
            for step in range(STEPS):
                opt.zero_grad()
                for p in net.parameters():
                    p.grad = gradient(rank, step, p.shape)
                opt.step()
                if step == 4:
                    saved = copy.deepcopy(
                        {"dp": dp.state_dict(), "opt": opt.state_dict(), "model": net.state_dict()}
                    )
        torch.manual_seed(123)
        net2 = nn.Sequential(nn.Linear(3, 97), nn.Tanh(), nn.Linear(97, 5))
        net2.load_state_dict(saved["model"])
        opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
        opt2.load_state_dict(saved["opt"])
        with localsgd.DataParallel(net2, opt2, algo) as dp2:
            dp2.load_state_dict(saved["dp"])
            for step in range(5, STEPS):
                opt2.zero_grad()
                for p in net2.parameters():
                    p.grad = gradient(rank, step, p.shape)
                opt2.step()
        has_state = "compression" in saved["dp"]["algorithm"] or "compression" in saved["dp"][
            "algorithm"
        ].get("local", {})
        out[name] = (flat(list(net.parameters())), flat(list(net2.parameters())), has_state)
    return out


def test_resume_is_exact_with_the_residual():
    for name, (whole, again, has_state) in run_world(resumed, 2)[0].items():
        assert has_state, name
        assert torch.equal(whole, again), name


RUN = {
    "workload": {"name": "scenarios:mnist1d_cnn_float64", "num_samples": 1000},
    "workers": 2,
    "seed": 3,
    "algorithm": {"name": "local_sgd", "period": 3, "compression": {"codec": "int8", "error_feedback": True}},
    "data": {"batch_size": 16},
    "optimizer": {"lr": 0.05},
    "train": {"epochs": 10, "max_steps": 12, "eval_every": 6},
}


def run_processes(rank: int, world: int, folder: str, cache: str) -> Any:
    import os

    os.environ["XDG_CACHE_HOME"] = cache
    from localsgd.run.config import run_config
    from localsgd.run.training import train

    run_dir = Path(folder) if rank == 0 else None
    status = train(run_config({**RUN, "engine": "processes"}), run_dir, rank, world, "gloo")
    return status


def test_a_compressed_run_records_the_same_bytes_and_model_on_both_engines(tmp_path, data_cache, monkeypatch):
    """A whole int8 run with error feedback through the training loop: the run record's
    counters (what the report and the cost model read) are the payload's on both engines,
    and the models agree (float64, as the engines' other equivalence tests)."""
    from localsgd.run.config import run_config
    from localsgd.run.training import train

    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    (tmp_path / "p").mkdir()
    (tmp_path / "s").mkdir()
    processes = run_world(run_processes, 2, str(tmp_path / "p"), data_cache)[0]
    simulated = train(run_config({**RUN, "engine": "simulated"}), tmp_path / "s", 0, 1)
    assert processes.status == simulated.status == "completed"
    p, s = processes.counters, simulated.counters
    assert (p.syncs, p.collectives, p.bytes) == (s.syncs, s.collectives, s.bytes)
    timed = ("seconds", "codec_seconds")  # measured, so each engine's own
    assert {k: v for k, v in p.by_scope["world"].items() if k not in timed} == {
        k: v for k, v in s.by_scope["world"].items() if k not in timed
    }
    params = torch.load(tmp_path / "p" / "checkpoint.pt")["model"]
    n = sum(v.numel() for k, v in params.items() if v.is_floating_point() and "running" not in k)
    statistics = sum(v.numel() for k, v in params.items() if "running" in k)  # BatchNorm's, float64
    # 4 syncs: the parameters' int8 deltas gathered, the buffers all-reduced exactly beside them.
    world = p.by_scope["world"]
    assert (p.syncs, world["collectives"], world["gathers"]) == (4, 8, 4)
    assert world["gathered_bytes"] == 4 * payload_bytes(Compression(codec="int8"), n)
    assert world["bytes"] == world["gathered_bytes"] + 4 * 8 * statistics
    # Values through the codec per worker: n encoded per sync; decoded, both members' payloads
    # and its own once more (error feedback).
    assert (world["encoded"], world["decoded"]) == (4 * n, 4 * 3 * n)
    assert 0 < world["codec_seconds"] < world["seconds"]
    other = torch.load(tmp_path / "s" / "checkpoint.pt")["model"]
    for key, tensor in params.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(other[key], tensor, rtol=1e-10, atol=1e-12)


def test_batched_trials_compress_each_world_apart():
    """Trials stacked as independent worlds (groups > 1): each world's compressed average
    is the one it gets alone, block scopes included."""
    from localsgd.comm.base import WORLD, Block
    from localsgd.comm.codecs import WireState

    values = torch.stack([gradient(k, 0, torch.Size([300])) for k in range(8)])
    for scope in (WORLD, Block(2)):
        together = values.clone()
        SimulatedCommunicator(4, groups=2).average(
            [together], scope, codec=WireState(Compression(codec="int4"))
        )
        for world in range(2):
            alone = values[4 * world : 4 * world + 4].clone()
            SimulatedCommunicator(4).average([alone], scope, codec=WireState(Compression(codec="int4")))
            assert torch.equal(together[4 * world : 4 * world + 4], alone)


def test_ddp_averaged_gradients_refuse_a_codec():
    from localsgd.algorithms.base import SyncContext
    from localsgd.comm.solo import SoloCommunicator

    net = model()
    ctx = SyncContext(
        SoloCommunicator(), list(net.parameters()), [], torch.optim.SGD(net.parameters(), lr=0.1)
    )
    ctx.gradients_averaged = lambda: None
    with pytest.raises(ValueError, match="DistributedDataParallel model DDP averages them uncompressed"):
        A.MiniBatchSGD(compression={"codec": "int8"}).bind(ctx)
    A.MiniBatchSGD().bind(ctx)  # uncompressed: DDP's averaging is counted as before


def test_resume_is_exact_on_the_simulated_engine():
    """The stacked replicas' residuals (every replica's) and anchor resume exactly too."""
    world = 4
    for name, algo in configs(world).items():

        def run(
            stop: int | None, state: dict[str, Any] | None, algo: A.AlgorithmConfig = algo
        ) -> tuple[torch.Tensor, dict[str, Any] | None]:
            stacked = StackedModel(model(), world)
            opt = torch.optim.SGD(stacked.parameters(), lr=0.1, momentum=0.9)
            saved = None
            with localsgd.DataParallel(
                stacked, opt, algo, comm=SimulatedCommunicator(world), flat=False
            ) as dp:
                first = 0
                if state is not None:
                    opt.load_state_dict(state["opt"])
                    dp.load_state_dict(state["dp"])
                    first = 5
                for step in range(first, STEPS):
                    opt.zero_grad()
                    for p in stacked.parameters():
                        p.grad = torch.stack([gradient(k, step, p.shape[1:]) for k in range(world)])
                    opt.step()
                    if step + 1 == stop:
                        saved = copy.deepcopy({"dp": dp.state_dict(), "opt": opt.state_dict()})
            return torch.cat([p.detach().reshape(-1) for p in stacked.parameters()]), saved

        whole, saved = run(5, None)
        assert saved is not None
        again, _ = run(None, saved)
        assert torch.equal(whole, again), name
