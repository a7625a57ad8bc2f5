"""What one local-SGD parameter sync costs on real gloo process groups, against its limit.

For a ResNet-20 (0.27 M parameters in 65 tensors: latency-bound) and a 25 M-parameter MLP
(bandwidth-bound), at each world size K, the same K processes time these, interleaved
(:func:`shared.interleaved`: every repetition runs each variant once, in an order that
rotates; a variant's value in a repetition is the median of many calls, each after a
barrier, and a sync's time is the slowest rank's, since a sync is done when every rank is).
``ours``, ``raw`` and ``raw_scaled`` alternate call by call within a repetition, so the
ratio between them is taken over the same moments of a shared machine:

- ``ours``: ``LocalSGD(period=1)``'s sync through :class:`localsgd.DataParallel`, the whole
  Python path (synchronizer, averager, span check, communicator, counters);
- ``raw``: one ``torch.distributed.all_reduce`` (SUM) of the same bytes, **on the same
  buffer**: the flat storage ``DataParallel`` made of the parameters. The limit is thus
  the collective itself with nothing else changed: same allocation and alignment, same
  cache state (the variants touch the same memory in turn), same values, the same public
  call ``ours`` makes. The parameters are zeros, identical on every rank, so repeated SUMs
  stay finite and no denormal ever slows the arithmetic (a collective's speed does not
  depend on the values otherwise);
- ``raw_scaled``: ``raw`` then the ``mul_(1/K)`` an average needs on gloo, which has no
  averaging reduction that is faster (its ``AVG`` measured slower than SUM then one pass);
- ``per_tensor``: one ``all_reduce`` and one divide per parameter tensor (HF accelerate's
  LocalSGD; accelerate also clones each tensor, so it is slower still), on a plain copy;
- ``torch_averager``: ``PeriodicModelAverager(period=1).average_parameters`` on a plain
  (not flattened) copy of the model.

The ratios (``shared.ratio``: per repetition, then median and range) are ours/raw (the
target: <= 1.05 for the ResNet-20 at K = 2 and 4), ours/raw_scaled, per_tensor/ours and
torch_averager/ours.

And the training-step overhead of being wrapped: a ResNet-20 step on 32 CIFAR-sized images
inside ``DataParallel`` with ``LocalSGD(period=10**9)`` (no sync ever due) against the
same bare step, and a second bare twin against the first (A/A: the noise floor), the three
interleaved the same way; a repetition's value is a rank's median step, in this thread's
CPU time (with one intra-op thread the whole step runs on it, so that is the work the
wrapper adds; wall time, reported too, mostly measures the scheduler on a shared box), and
a ratio's value is the worst rank's.

Nothing here is asserted: this is a measurement, not a test.

    python benchmarks/sync_cost.py            # full run, about 3 minutes on 2 cores
    python benchmarks/sync_cost.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from shared import MIN_REPS, interleaved, machine_at_end, ratio, ratio_line, run_ranks, write_results
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

import localsgd
from localsgd.algorithms.local_sgd import LocalSGDSync
from localsgd.comm.flat import contiguous_span
from localsgd.run.worker import exit_process

log = logging.getLogger("sync_cost")

SYNC_VARIANTS = ("ours", "raw", "raw_scaled", "per_tensor", "torch_averager")
STEP_ARMS = ("bare", "wrapped", "bare_twin")
TARGET = 1.05  # ours / raw, ResNet-20, K = 2 and 4
MODELS = {"resnet20": "ResNet-20", "mlp": "MLP"}


@dataclass(frozen=True)
class BenchConfig:
    """Repetitions, calls per repetition and model sizes; ``--quick`` swaps in :data:`QUICK`.

    ``*_oversubscribed`` apply when there are more ranks than cores: every collective then
    waits on the scheduler (a per-tensor sync of the ResNet costs ~0.4 s), and the full
    counts would blow the few-minute budget.
    """

    world_sizes: tuple[int, ...] = (2, 4)
    models: tuple[str, ...] = tuple(MODELS)
    reps: int = 7
    warmup: int = 1
    resnet_calls: int = 300
    resnet_calls_oversubscribed: int = 15
    resnet_per_tensor_calls: int = 5
    resnet_per_tensor_calls_oversubscribed: int = 3
    mlp_calls: int = 5
    mlp_calls_oversubscribed: int = 3
    mlp_width: int = 1440
    mlp_depth: int = 12
    step_batch: int = 32
    step_warmup: int = 2
    steps_per_rep: int = 4


QUICK = BenchConfig(
    world_sizes=(2,),
    reps=2,
    resnet_calls=5,
    resnet_calls_oversubscribed=3,
    resnet_per_tensor_calls=1,
    resnet_per_tensor_calls_oversubscribed=1,
    mlp_calls=1,
    mlp_calls_oversubscribed=1,
    mlp_width=256,
    mlp_depth=4,
    step_warmup=1,
    steps_per_rep=1,
)


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# -- models -----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """He et al.'s CIFAR basic block; a 1x1 conv + BN projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet20(num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def build_model(name: str, cfg: BenchConfig) -> nn.Module:
    # The same seed on every rank, so every replica starts equal and averaging keeps the
    # values fixed: repeated syncs never drift into denormals that would slow the math.
    torch.manual_seed(0)
    if name == "resnet20":
        return resnet20()
    return mlp(cfg.mlp_width, cfg.mlp_depth)


# -- what each rank runs ----------------------------------------------------------------------


def median_call(fn: Callable[[], Any], calls: int) -> float:
    """This rank's median seconds per call; a barrier lines the ranks up before each call, so
    a call's time is the operation's, not the wait for a late peer."""
    return alternating_medians({"call": fn}, calls)["call"]


def alternating_medians(fns: dict[str, Callable[[], Any]], calls: int) -> dict[str, float]:
    """This rank's median seconds per call of each function, the functions called in turn
    (the order rotating every round), each call after a barrier: every variant sees the
    same moments of a shared machine, so their ratio does not carry its drift."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(calls):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            dist.barrier()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def slowest(values: dict[str, list[float]], world: int) -> dict[str, list[float]]:
    """Per variant and repetition, the largest value over the ranks."""
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, values)
    return {v: [max(g[v][i] for g in gathered) for i in range(len(values[v]))] for v in values}


def sync_costs(name: str, cfg: BenchConfig, rank: int, world: int) -> dict[str, Any]:
    model = build_model(name, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # see the module docstring: SUMs of zeros stay zeros
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    # Plain copies, taken before DataParallel flattens `model`: the baselines see the
    # per-tensor storage a user's model has.
    per_tensor_model = copy.deepcopy(model)
    torch_model = copy.deepcopy(model)
    # PeriodicModelAverager skips parameters whose .grad is None (get_params_to_average),
    # and a fresh copy has none: without grads there would be nothing to average.
    for p in torch_model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that period=1 is what DDP is for
        averager = PeriodicModelAverager(period=1, warmup_steps=0)
    inv = 1.0 / world

    def per_tensor() -> None:
        for p in per_tensor_model.parameters():
            dist.all_reduce(p.data)
            p.data.div_(world)

    def torch_average() -> None:
        before = averager.step
        averager.average_parameters(torch_model.parameters())
        # period=1, warmup 0: (step - 0) % 1 == 0 always holds, so every call averages.
        assert averager.step == before + 1, (before, averager.step)

    oversubscribed = world > usable_cores()
    if name == "resnet20":
        calls = cfg.resnet_calls_oversubscribed if oversubscribed else cfg.resnet_calls
        slow_calls = (
            cfg.resnet_per_tensor_calls_oversubscribed if oversubscribed else cfg.resnet_per_tensor_calls
        )
    else:
        calls = slow_calls = cfg.mlp_calls_oversubscribed if oversubscribed else cfg.mlp_calls

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algorithm = localsgd.algorithms.LocalSGD(period=1, average_buffers=False)
    with localsgd.DataParallel(model, opt, algorithm) as dp:
        sync = dp._sync
        assert isinstance(sync, LocalSGDSync), type(sync)
        flat = contiguous_span(params)
        assert flat is not None and flat.numel() == n_params, "params are not one buffer"
        # ours and its two limits alternate call by call; the slow baselines run apart.
        paired: dict[str, Callable[[], Any]] = {
            "ours": sync.sync,
            "raw": lambda: dist.all_reduce(flat),
            "raw_scaled": lambda: (dist.all_reduce(flat), flat.mul_(inv)),
        }
        apart: dict[str, Callable[[], Any]] = {"per_tensor": per_tensor, "torch_averager": torch_average}
        calls_per_rep = {**dict.fromkeys(paired, calls), **dict.fromkeys(apart, slow_calls)}
        start = time.perf_counter()
        values = interleaved(
            {
                "sync": lambda: alternating_medians(paired, calls),
                **{v: (lambda fn=fn: median_call(fn, slow_calls)) for v, fn in apart.items()},
            },
            reps=cfg.reps,
            warmup=cfg.warmup,
        )
        if rank == 0:
            log.info(
                "world %d %s: %d repetitions in %.1f s", world, name, cfg.reps, time.perf_counter() - start
            )
        syncs = dp.stats["syncs"]
        comm_seconds = dp.stats["comm_seconds"]
    assert syncs == (cfg.reps + cfg.warmup) * calls, (syncs, cfg, calls)
    return {
        "params": n_params,
        "param_tensors": len(params),
        "calls_per_rep": calls_per_rep,
        "oversubscribed": oversubscribed,
        "slowest_s": slowest(values, world),
        # The library's own figure: the seconds it records around its collective (and scale).
        "comm_seconds_per_sync": comm_seconds / syncs,
    }


def step_overhead(cfg: BenchConfig, rank: int, world: int) -> dict[str, Any]:
    """Per-step time of three identical ResNet-20s on the same batch: one wrapped, one bare,
    and a second bare one whose ratio to the first (A/A) is the noise floor."""
    arms: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for arm in STEP_ARMS:
        model = build_model("resnet20", cfg)
        arms[arm] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(cfg.step_batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (cfg.step_batch,), generator=g)

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - wall, time.thread_time() - cpu

    wall: dict[str, list[float]] = {arm: [] for arm in STEP_ARMS}

    def arm_median(arm: str) -> float:
        # Ranks share the cores: lined up, every arm sees the same contention.
        dist.barrier()
        times = [step(*arms[arm]) for _ in range(cfg.steps_per_rep)]
        wall[arm].append(statistics.median(t[0] for t in times))
        return statistics.median(t[1] for t in times)

    algorithm = localsgd.algorithms.LocalSGD(period=10**9)
    with localsgd.DataParallel(*arms["wrapped"], algorithm) as dp:
        for _ in range(cfg.step_warmup):
            for arm in STEP_ARMS:
                step(*arms[arm])
        cpu = interleaved({arm: (lambda arm=arm: arm_median(arm)) for arm in STEP_ARMS}, reps=cfg.reps)
        syncs = dp.stats["syncs"]
    assert syncs == 0, f"a sync fired during the step benchmark: {syncs}"
    clocks = {"cpu": cpu, "wall": wall}
    out: dict[str, Any] = {"steps_per_rep": cfg.steps_per_rep}
    for clock, values in clocks.items():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, values)
        out[clock] = {
            "by_rank": gathered,
            # Per repetition, the worst rank's ratio.
            "ratio": [max(g["wrapped"][i] / g["bare"][i] for g in gathered) for i in range(cfg.reps)],
            "a_a_ratio": [max(g["bare_twin"][i] / g["bare"][i] for g in gathered) for i in range(cfg.reps)],
        }
    return out


def rank_main(rank: int, world: int, port: int, cfg_dict: dict[str, Any], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # One thread per rank: the ranks share the machine's cores, as they would on one node.
    torch.set_num_threads(1)
    cfg = BenchConfig(
        **{**cfg_dict, "world_sizes": tuple(cfg_dict["world_sizes"]), "models": tuple(cfg_dict["models"])}
    )
    try:
        localsgd.init_distributed(backend="gloo", timeout=120)
        result = {
            "sync": {name: sync_costs(name, cfg, rank, world) for name in cfg.models},
            "step": step_overhead(cfg, rank, world),
        }
    finally:
        localsgd.destroy_distributed()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    # Done: skip the interpreter's teardown, which can abort a finished gloo process
    # ("terminate called without an active exception", SIGABRT) and fail the whole world.
    exit_process(0)


# -- the launcher -----------------------------------------------------------------------------


def run_world(world: int, cfg: BenchConfig, timeout: float = 900.0) -> dict[str, Any]:
    """Rank 0's result (it holds every rank's figures); a rank that fails or hangs fails
    the run (no partial tables)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        run_ranks(rank_main, world, (dataclasses.asdict(cfg), out), Path(out), timeout)
        with open(out) as f:
            result: dict[str, Any] = json.load(f)
        return result


def world_ratios(world: int, result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, m in result["sync"].items():
        t = m["slowest_s"]
        target = {"target": TARGET, "at_most": True} if name == "resnet20" else {}
        out.append(ratio("ours/raw", t["ours"], t["raw"], **target, model=name, K=world))
        out.append(ratio("ours/raw_scaled", t["ours"], t["raw_scaled"], model=name, K=world))
        out.append(ratio("per_tensor/ours", t["per_tensor"], t["ours"], model=name, K=world))
        out.append(ratio("torch_averager/ours", t["torch_averager"], t["ours"], model=name, K=world))
    for clock in ("cpu", "wall"):
        st = result["step"][clock]
        ones = [1.0] * len(st["ratio"])
        out.append(ratio(f"wrapped/bare step ({clock})", st["ratio"], ones, model="resnet20", K=world))
        out.append(ratio(f"A/A bare twin/bare ({clock})", st["a_a_ratio"], ones, model="resnet20", K=world))
    return out


def span(r: dict[str, Any]) -> str:
    return f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]"


def tables(results: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def find(name: str, model: str, k: int) -> dict[str, Any]:
        return next(r for r in ratios if r["name"] == name and r["model"] == model and r["K"] == k)

    sync_rows = []
    step_rows = []
    for res in results:
        k = res["world_size"]
        for name, m in res["sync"].items():
            t = m["slowest_s"]
            ours_raw = find("ours/raw", name, k)
            sync_rows.append(
                [
                    k,
                    f"{MODELS[name]} ({m['params'] / 1e6:.2f} M, {m['param_tensors']} tensors)",
                    round(1e3 * statistics.median(t["ours"]), 3),
                    round(1e3 * statistics.median(t["raw"]), 3),
                    span(ours_raw) + (f" ({ours_raw['verdict']})" if ours_raw["verdict"] else ""),
                    span(find("ours/raw_scaled", name, k)),
                    span(find("per_tensor/ours", name, k)),
                    span(find("torch_averager/ours", name, k)),
                ]
            )
        for clock in ("cpu", "wall"):
            step_rows.append(
                [
                    k,
                    clock,
                    span(find(f"wrapped/bare step ({clock})", "resnet20", k)),
                    span(find(f"A/A bare twin/bare ({clock})", "resnet20", k)),
                ]
            )
    reps = len(ratios[0]["values"])
    return [
        {
            "title": "One local-SGD sync against one all-reduce of the same bytes (gloo, loopback)",
            "columns": [
                "K",
                "model",
                "ours ms",
                "raw ms",
                f"ours / raw (target <= {TARGET:g} for ResNet-20)",
                "ours / (raw + 1/K scale)",
                "per-tensor / ours",
                "PeriodicModelAverager / ours",
            ],
            "rows": sync_rows,
            "note": (
                f"Median [range] over {reps} interleaved repetitions, each the median of many "
                "calls after a barrier, the slowest rank's. raw is the same all-reduce on the "
                "parameters' own flat storage: same buffer, same caches, same call. ms columns: "
                "medians of the repetitions."
            ),
        },
        {
            "title": "A ResNet-20 training step inside DataParallel (no sync due) against the bare step",
            "columns": ["K", "clock", "wrapped / bare (worst rank)", "A/A: bare twin / bare (worst rank)"],
            "rows": step_rows,
            "note": (
                "Median [range] over the repetitions of the worst rank's ratio of median steps; "
                "the A/A ratio of two identical bare models is the noise floor."
            ),
        },
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="few repetitions: a smoke run, not numbers to quote"
    )
    parser.add_argument(
        "--world-sizes", type=int, nargs="+", default=None, help="world sizes to run (default 2 4)"
    )
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=None, help="models to sync (default: both)"
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help=f"repetitions (default {BenchConfig.reps}; at least {MIN_REPS})",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else BenchConfig()
    if args.world_sizes:
        if any(k < 2 for k in args.world_sizes):
            raise ValueError(f"--world-sizes must all be >= 2, got {args.world_sizes}")
        cfg = dataclasses.replace(cfg, world_sizes=tuple(args.world_sizes))
    if args.models:
        cfg = dataclasses.replace(cfg, models=tuple(args.models))
    if args.reps is not None:
        if args.reps < MIN_REPS and not args.quick:
            raise ValueError(f"--reps must be >= {MIN_REPS}, got {args.reps}")
        cfg = dataclasses.replace(cfg, reps=args.reps)
    start = time.perf_counter()
    results = []
    ratios: list[dict[str, Any]] = []
    for world in cfg.world_sizes:
        log.info("world size %d: starting %d ranks", world, world)
        load_before = os.getloadavg()
        result = run_world(world, cfg)
        # Other jobs on a shared box skew every number; the load average says if they ran.
        result["world_size"] = world
        result["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
        results.append(result)
        ratios += world_ratios(world, result)
    wall = time.perf_counter() - start
    for r in ratios:
        print(ratio_line(r))
    print(f"\nwall time {wall:.0f} s")
    return {
        "command": [sys.executable, *sys.argv],
        "quick": args.quick,
        "config": dataclasses.asdict(cfg),
        "wall_s": wall,
        "ratios": ratios,
        "tables": tables(results, ratios),
        "results": results,
        "machine": machine_at_end(),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    record = run(parse_args())
    write_results("sync_cost", record, record["quick"])


if __name__ == "__main__":
    main()
