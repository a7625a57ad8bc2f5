"""What one local-SGD parameter sync costs on real gloo process groups, against its limits.

For a ResNet-20 (0.27 M parameters in 65 tensors: latency-bound) and a 25 M-parameter MLP
(bandwidth-bound), at each world size, the same processes time, interleaved:

- ``ours``: ``LocalSGD(period=1)``'s sync through :class:`localsgd.DataParallel`;
- ``raw``: one ``all_reduce`` of a flat float32 buffer of the same size (the limit);
- ``raw_scaled``: ``raw`` plus the ``mul_(1/K)`` that gloo forces (it has no AVG);
- ``scale``: that ``mul_`` alone, to see its share;
- ``bookkeeping``: the per-tensor Python work a sync does before its collective (checking
  that the cached flat span still covers every parameter), alone;
- ``per_tensor``: one ``all_reduce`` and one divide per parameter tensor (HF accelerate's
  LocalSGD; accelerate also clones each tensor, so it is slower still);
- ``torch_averager``: ``PeriodicModelAverager(period=1).average_parameters`` on a plain
  (not flattened) copy of the model.

And the training-step overhead of being wrapped: a ResNet-20 step on 32 CIFAR-sized images
inside ``DataParallel`` with ``LocalSGD(period=10**9)`` (no sync ever due) against the same
bare step, and against a second bare twin whose ratio to the first (A/A) shows the noise
floor; the three run in short blocks whose order rotates, to cancel drift.

Times are medians after warm-up; a sync's time is the slowest rank's median (a sync is done
when every rank is done). Nothing here is asserted: this is a measurement, not a test.

    python benchmarks/sync_cost.py            # full run, a few minutes on 2 cores
    python benchmarks/sync_cost.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
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
from torch import nn
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

import localsgd
from localsgd.algorithms.local_sgd import LocalSGDSync
from localsgd.comm.flat import contiguous_span

log = logging.getLogger("sync_cost")

RESULTS = Path(__file__).resolve().parent / "results"
SYNC_METHODS = ("ours", "raw", "raw_scaled", "scale", "bookkeeping", "per_tensor", "torch_averager")


@dataclass(frozen=True)
class BenchConfig:
    """Repetition counts and model sizes; ``--quick`` swaps in :data:`QUICK`.

    ``*_oversubscribed`` apply when there are more ranks than cores: every collective then
    waits on the scheduler, a per-tensor sync of the ResNet costs ~0.5 s, and the full
    counts would blow the few-minute budget.
    """

    world_sizes: tuple[int, ...] = (2, 4)
    resnet_reps: int = 200
    resnet_reps_oversubscribed: int = 40
    resnet_warmup: int = 10
    mlp_reps: int = 20
    mlp_reps_oversubscribed: int = 12
    mlp_warmup: int = 2
    mlp_width: int = 1440
    mlp_depth: int = 12
    step_batch: int = 32
    step_warmup: int = 3
    step_blocks: int = 18
    step_blocks_oversubscribed: int = 9
    steps_per_block: int = 2


QUICK = BenchConfig(
    resnet_reps=20,
    resnet_reps_oversubscribed=5,
    resnet_warmup=2,
    mlp_reps=3,
    mlp_reps_oversubscribed=2,
    mlp_warmup=1,
    step_warmup=1,
    step_blocks=3,
    step_blocks_oversubscribed=3,
    steps_per_block=1,
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


def time_interleaved(methods: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each method; the order rotates every repetition so no method
    always follows the same neighbour, and a barrier lines the ranks up before each call."""
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            dist.barrier()
            start = time.perf_counter()
            methods[name]()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(elapsed)
    return times


def sync_costs(name: str, cfg: BenchConfig, rank: int, world: int) -> dict[str, Any]:
    model = build_model(name, cfg)
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
    # Zeros: repeated SUMs without the scale would otherwise grow to inf.
    raw = torch.zeros(n_params)
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

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algorithm = localsgd.algorithms.LocalSGD(period=1, average_buffers=False)
    with localsgd.DataParallel(model, opt, algorithm) as dp:
        sync = dp._sync
        assert isinstance(sync, LocalSGDSync), type(sync)
        span = contiguous_span(params)
        assert span is not None and span.numel() == n_params, "params are not one buffer"
        methods: dict[str, Callable[[], Any]] = {
            "ours": sync.sync,
            "raw": lambda: dist.all_reduce(raw),
            "raw_scaled": lambda: (dist.all_reduce(raw), raw.mul_(inv)),
            "scale": lambda: raw.mul_(inv),
            # What the library does per sync now: check the cached span is still valid.
            "bookkeeping": lambda: sync.ctx.model_tensors(params=True, buffers=False),
            "per_tensor": per_tensor,
            "torch_averager": torch_average,
        }
        oversubscribed = world > usable_cores()
        if name == "resnet20":
            reps = cfg.resnet_reps_oversubscribed if oversubscribed else cfg.resnet_reps
            warmup = cfg.resnet_warmup
        else:
            reps = cfg.mlp_reps_oversubscribed if oversubscribed else cfg.mlp_reps
            warmup = cfg.mlp_warmup
        start = time.perf_counter()
        times = time_interleaved(methods, reps, warmup)
        if rank == 0:
            log.info("rank 0: world %d %s: %d reps in %.1f s", world, name, reps, time.perf_counter() - start)
        syncs = dp.stats["syncs"]
    assert syncs == reps + warmup, (syncs, reps, warmup)
    # The library's own figure: the seconds it records around its collective (and scale).
    comm_seconds = dp.stats["comm_seconds"] / syncs
    return {
        "params": n_params,
        "param_tensors": len(params),
        "reps": reps,
        "oversubscribed": oversubscribed,
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        # A low quantile is what the operation costs when the scheduler leaves it alone.
        "p20_s": {m: statistics.quantiles(t, n=5)[0] for m, t in times.items()},
        "comm_seconds_per_sync": comm_seconds,
    }


def step_overhead(cfg: BenchConfig, rank: int, world: int) -> dict[str, Any]:
    """Per-step time of three identical ResNet-20s on the same batch: one wrapped, one bare,
    and a second bare one whose ratio to the first (A/A) is the noise floor."""
    arms: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for arm in ("bare", "wrapped", "bare_twin"):
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

    names = list(arms)
    times: dict[str, list[tuple[float, float]]] = {arm: [] for arm in names}
    blocks = cfg.step_blocks_oversubscribed if world > usable_cores() else cfg.step_blocks
    algorithm = localsgd.algorithms.LocalSGD(period=10**9)
    with localsgd.DataParallel(*arms["wrapped"], algorithm) as dp:
        for _ in range(cfg.step_warmup):
            for arm in names:
                step(*arms[arm])
        for block in range(blocks):
            # Rotating the order gives every arm every slot equally often: slow drift and
            # "first after the barrier" effects land on all three alike.
            shift = block % len(names)
            for arm in names[shift:] + names[:shift]:
                # Ranks share the cores: lined up, every block sees the same contention.
                dist.barrier()
                for _ in range(cfg.steps_per_block):
                    times[arm].append(step(*arms[arm]))
        syncs = dp.stats["syncs"]
    assert syncs == 0, f"a sync fired during the step benchmark: {syncs}"
    # Wall time is what a user waits for, but on a shared or oversubscribed box it mostly
    # measures the scheduler. With one intra-op thread the whole step (autograd included,
    # for CPU tensors) runs on this thread, so its CPU time is the work the wrapper adds.
    out: dict[str, Any] = {"steps_each": len(times["bare"])}
    for i, clock in enumerate(("wall", "cpu")):
        median = {arm: statistics.median(t[i] for t in times[arm]) for arm in names}
        out[clock] = {
            **{f"{arm}_s": median[arm] for arm in names},
            "ratio": median["wrapped"] / median["bare"],
            "a_a_ratio": median["bare_twin"] / median["bare"],
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
    cfg = BenchConfig(**{**cfg_dict, "world_sizes": tuple(cfg_dict["world_sizes"])})
    try:
        localsgd.init_distributed(backend="gloo", timeout=120)
        result = {
            "sync": {name: sync_costs(name, cfg, rank, world) for name in ("resnet20", "mlp")},
            "step": step_overhead(cfg, rank, world),
        }
    finally:
        localsgd.destroy_distributed()
    with open(out, "w") as f:
        json.dump(result, f)


# -- the launcher -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_world(world: int, cfg: BenchConfig, timeout: float = 900.0) -> list[dict[str, Any]]:
    """Every rank's result; a rank that fails or hangs fails the run (no partial tables)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"rank{r}.json") for r in range(world)]
        procs = [
            ctx.Process(target=rank_main, args=(r, world, port, dataclasses.asdict(cfg), outs[r]))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"world {world}: ranks {hung} still running after {timeout}s")
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0 or not Path(outs[r]).exists()]
        if failed:
            raise RuntimeError(f"world {world}: ranks {failed} failed (see their tracebacks)")
        results = []
        for path in outs:
            with open(path) as f:
                results.append(json.load(f))
        return results


def summarize(world: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    models = {}
    for name in ranks[0]["sync"]:
        per_rank = [r["sync"][name] for r in ranks]
        slowest = {m: max(r["median_s"][m] for r in per_rank) for m in SYNC_METHODS}
        slowest_p20 = {m: max(r["p20_s"][m] for r in per_rank) for m in SYNC_METHODS}
        models[name] = {
            "params": per_rank[0]["params"],
            "param_tensors": per_rank[0]["param_tensors"],
            "reps": per_rank[0]["reps"],
            "oversubscribed": per_rank[0]["oversubscribed"],
            "median_s": slowest,
            "median_s_by_rank": [r["median_s"] for r in per_rank],
            "p20_s": slowest_p20,
            "p20_s_by_rank": [r["p20_s"] for r in per_rank],
            "comm_seconds_per_sync_by_rank": [r["comm_seconds_per_sync"] for r in per_rank],
            "ours_over_raw": slowest["ours"] / slowest["raw"],
            "ours_over_raw_p20": slowest_p20["ours"] / slowest_p20["raw"],
            "ours_over_raw_scaled": slowest["ours"] / slowest["raw_scaled"],
            "scale_share_of_ours": slowest["scale"] / slowest["ours"],
            "bookkeeping_share_of_ours": slowest["bookkeeping"] / slowest["ours"],
            "per_tensor_over_ours": slowest["per_tensor"] / slowest["ours"],
            "torch_averager_over_ours": slowest["torch_averager"] / slowest["ours"],
        }
    steps = [r["step"] for r in ranks]
    step: dict[str, Any] = {"steps_each": steps[0]["steps_each"]}
    for clock in ("wall", "cpu"):
        step[clock] = {
            "bare_s_by_rank": [s[clock]["bare_s"] for s in steps],
            "wrapped_s_by_rank": [s[clock]["wrapped_s"] for s in steps],
            "bare_twin_s_by_rank": [s[clock]["bare_twin_s"] for s in steps],
            "ratio_by_rank": [s[clock]["ratio"] for s in steps],
            "ratio_max": max(s[clock]["ratio"] for s in steps),
            "a_a_ratio_by_rank": [s[clock]["a_a_ratio"] for s in steps],
        }
    return {"world_size": world, "sync": models, "step": step}


def table(summaries: list[dict[str, Any]]) -> str:
    head = (
        f"{'K':>2} {'model':<9} {'params':>11} {'ours ms':>9} {'raw ms':>9} "
        f"{'ours/raw':>8} {'(p20)':>6} {'ours/raw+scale':>14} {'scale%':>6} {'bookkeep%':>9} "
        f"{'per_tensor/ours':>15} {'torch_avg/ours':>14}"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        for name, m in s["sync"].items():
            t = m["median_s"]
            lines.append(
                f"{s['world_size']:>2} {name:<9} {m['params']:>7,}/{m['param_tensors']:<3} "
                f"{1e3 * t['ours']:>9.3f} {1e3 * t['raw']:>9.3f} {m['ours_over_raw']:>8.3f} "
                f"{m['ours_over_raw_p20']:>6.3f} "
                f"{m['ours_over_raw_scaled']:>14.3f} {100 * m['scale_share_of_ours']:>5.1f}% "
                f"{100 * m['bookkeeping_share_of_ours']:>8.1f}% "
                f"{m['per_tensor_over_ours']:>15.2f} {m['torch_averager_over_ours']:>14.2f}"
            )
    lines.append("")
    lines.append(
        f"{'K':>2} {'clock':<5} {'step: bare ms by rank':<24} {'wrapped ms by rank':<24} "
        f"{'wrapped/bare by rank':<24} {'max':>6}  {'A/A (twin/bare) by rank':<24}"
    )
    for s in summaries:
        for clock in ("cpu", "wall"):
            st = s["step"][clock]
            bare = " ".join(f"{1e3 * v:.1f}" for v in st["bare_s_by_rank"])
            wrapped = " ".join(f"{1e3 * v:.1f}" for v in st["wrapped_s_by_rank"])
            ratios = " ".join(f"{v:.3f}" for v in st["ratio_by_rank"])
            a_a = " ".join(f"{v:.3f}" for v in st["a_a_ratio_by_rank"])
            lines.append(
                f"{s['world_size']:>2} {clock:<5} {bare:<24} {wrapped:<24} {ratios:<24} "
                f"{st['ratio_max']:>6.3f}  {a_a:<24}"
            )
    lines.append("")
    lines.append(
        "targets: ours/raw <= 1.15, wrapped/bare <= 1.03. Sync times: the slowest "
        "rank's median; step: each rank's median, this thread's CPU time and wall time"
    )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = None, None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable_cores(),
        "threads_per_rank": 1,
        "git_sha": sha,
        "git_dirty": dirty,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="few repetitions: a smoke run, not numbers to quote"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/sync_cost.json, or sync_cost.quick.json with --quick)",
    )
    parser.add_argument(
        "--world-sizes", type=int, nargs="+", default=None, help="world sizes to run (default 2 4)"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = QUICK if args.quick else BenchConfig()
    if args.world_sizes:
        if any(k < 2 for k in args.world_sizes):
            raise ValueError(f"--world-sizes must all be >= 2, got {args.world_sizes}")
        cfg = dataclasses.replace(cfg, world_sizes=tuple(args.world_sizes))
    start = time.perf_counter()
    summaries = []
    for world in cfg.world_sizes:
        log.info("world size %d: starting %d ranks", world, world)
        load_before = os.getloadavg()
        summary = summarize(world, run_world(world, cfg))
        # Other jobs on a shared box skew every number; the load average says if they ran.
        summary["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
        summaries.append(summary)
    wall = time.perf_counter() - start
    print(table(summaries))
    print(f"\nwall time {wall:.0f} s")
    return {
        "command": [sys.executable, *sys.argv],
        "quick": args.quick,
        "config": dataclasses.asdict(cfg),
        "machine": machine(),
        "wall_s": wall,
        "results": summaries,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    out = args.out or RESULTS / ("sync_cost.quick.json" if args.quick else "sync_cost.json")
    record = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
