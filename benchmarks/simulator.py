"""How fast the simulated engine trains K replicas, against its reference points and
against what this CPU could do at best.

Throughput: for the MNIST-1D MLP and CNN at K = 4, 16, 64 replicas of per-replica batch B,
one process, one thread for all (``--threads``), four variants interleaved (each
repetition runs every variant once, in a rotating order; >= 5 repetitions after a warm-up):

- ``fused``: :class:`~localsgd.engines.simulated.engine.StackedModel` with the fused stacked
  layers (batched matmuls, grouped convolutions, per-replica BatchNorm in one kernel) + one
  optimizer over the stacked tensors, inside ``DataParallel`` with ``LocalSGD(H=8)`` and
  the simulated communicator (what ``engine = "simulated"`` runs);
- ``vmap``: the same with ``vmap(grad)`` (the fallback for other modules);
- ``loop``: K model copies and K optimizers stepped one after another, averaged every 8
  steps (how simulations are usually written);
- ``single``: one model trained at batch K·B. The replicas do the same arithmetic, so this
  is the physical limit of any batched simulation but for the K-fold parameter traffic.

The process keeps freed memory mapped as the simulated engine's does
(:func:`~localsgd.engines.simulated.stacked.retain_freed_memory`), for every variant.
One measurement of a variant is its seconds per step over whole periods of H = 8 steps,
for at least ``--budget`` seconds. Ratios are taken per repetition (throughput of the
first over the second) and reported as median and range.

Roofline: the CPU is calibrated first (:func:`calibrate`: a large GEMM, the CNN's
convolution at a large batch, and a large add for the memory bandwidth), each step's
work is counted (:func:`step_cost`: matmul and convolution FLOPs of forward and backward,
bytes moved for K replicas), and ``fused / roofline`` is the fused step's time over the
estimate ``matmul FLOPs / GEMM rate + conv FLOPs / conv rate + bytes / bandwidth``.

The 64-trial search batched in one process is measured by ``benchmarks/search.py``.

Nothing is asserted: this is a measurement.

    python benchmarks/simulator.py               # throughput and roofline, about 5 minutes
    python benchmarks/simulator.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from shared import MIN_REPS, interleaved, machine_at_end, ratio, ratio_line, write_results
from torch import nn

import localsgd
from localsgd import algorithms, workloads
from localsgd.engines.simulated.engine import (
    ReplicaGradients,
    SimulatedCommunicator,
    StackedModel,
    retain_freed_memory,
)

PERIOD = 8
LENGTH = 40  # MNIST-1D signal length


def make_batches(k: int, b: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Batches stacked over K replicas, as the simulated engine feeds them."""
    g = torch.Generator().manual_seed(0)
    return [
        {"x": torch.randn(k, b, LENGTH, generator=g), "y": torch.randint(0, 10, (k, b), generator=g)}
        for _ in range(count)
    ]


Step = Callable[[dict[str, torch.Tensor]], None]


def simulated_runner(template: nn.Module, k: int, loss: Callable, fused: bool = True) -> Step:
    stacked = StackedModel(template, k)
    grads = ReplicaGradients(stacked, loss, fused=fused)
    opt = torch.optim.SGD(stacked.parameters(), lr=0.05, momentum=0.9)
    dp = localsgd.DataParallel(
        stacked, opt, algorithms.LocalSGD(period=PERIOD), comm=SimulatedCommunicator(k), flat=False
    )
    dp.__enter__()

    def step(batch: dict[str, torch.Tensor]) -> None:
        opt.zero_grad()
        grads(batch)
        opt.step()

    return step


def loop_runner(make: Callable[[], nn.Module], k: int, loss: Callable) -> Step:
    models = [make() for _ in range(k)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    count = [0]

    def step(batch: dict[str, torch.Tensor]) -> None:
        for i, (m, o) in enumerate(zip(models, opts)):
            o.zero_grad()
            loss(m, {"x": batch["x"][i], "y": batch["y"][i]}).backward()
            o.step()
        count[0] += 1
        if count[0] % PERIOD == 0:
            with torch.no_grad():
                for ps in zip(*(m.parameters() for m in models)):
                    mean = torch.stack(ps).mean(0)
                    for p in ps:
                        p.copy_(mean)

    return step


def single_runner(template: nn.Module, loss: Callable) -> Step:
    opt = torch.optim.SGD(template.parameters(), lr=0.05, momentum=0.9)

    def step(batch: dict[str, torch.Tensor]) -> None:
        opt.zero_grad()
        loss(template, {"x": batch["x"].flatten(0, 1), "y": batch["y"].flatten()}).backward()
        opt.step()

    return step


def _best_seconds(fn: Callable[[], object], min_seconds: float = 0.2, tries: int = 3) -> float:
    """The fastest call of ``fn`` in CPU seconds of this process, each try repeating it for
    ``min_seconds``: a calibration wants what the CPU can do, not what a neighbour's load
    leaves of it (the steps themselves are timed by the wall clock)."""
    fn()
    best = float("inf")
    for _ in range(tries):
        calls, start = 0, time.process_time()
        while (elapsed := time.process_time() - start) < min_seconds or calls == 0:
            fn()
            calls += 1
        best = min(best, elapsed / calls)
    return best


def calibrate(quick: bool = False) -> dict[str, float]:
    """This CPU at the benchmark's thread count: GFLOP/s of a large fp32 GEMM and of the
    CNN's middle convolution (32 -> 32 channels, kernel 3, stride 2, length 19) forward and
    backward at a large batch, the faster of its two forms (``conv1d`` channels-first, and
    the channels-last 2-D form over ``(L, B)`` the fused path uses), and the
    :func:`bandwidth` of main memory (an add over 3 arrays of 32 MiB)."""
    n = 512 if quick else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    gemm = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b)) / 1e9
    batch = 512 if quick else 4096
    weight = torch.randn(32, 32, 3, requires_grad=True)
    x = torch.randn(batch, 32, 19, requires_grad=True)
    planes = torch.randn(19, batch, 32).view(1, 19, batch, 32).permute(0, 3, 1, 2).requires_grad_()

    def conv1d() -> None:
        F.conv1d(x, weight, stride=2, padding=1).sum().backward()

    def planar() -> None:
        F.conv2d(planes, weight.unsqueeze(-1), stride=(2, 1), padding=(1, 0)).sum().backward()

    # 3 x the forward's FLOPs: the forward, the input gradient and the weight gradient.
    conv_flops = 3 * 2 * batch * 32 * 10 * 32 * 3
    conv_rates = {
        form: conv_flops / _best_seconds(fn) / 1e9 for form, fn in (("conv1d", conv1d), ("planar", planar))
    }
    return {
        "gemm_gflops": gemm,
        "conv_gflops": max(conv_rates.values()),
        "conv1d_gflops": conv_rates["conv1d"],
        "conv_planar_gflops": conv_rates["planar"],
        "bandwidth_gbs": bandwidth(96 << 20),
    }


def bandwidth(nbytes: float) -> float:
    """GB/s of ``c = a + b`` over three fp32 arrays that together hold ``nbytes`` (two
    read, one written): from main memory for a large size, from the caches for a working
    set that fits them."""
    elements = max(int(nbytes) // 12, 1024)
    u, v, w = torch.randn(elements), torch.randn(elements), torch.empty(elements)
    return 3 * 4 * elements / _best_seconds(lambda: torch.add(u, v, out=w), min_seconds=0.1) / 1e9


def step_cost(workload: object, k: int, b: int) -> dict[str, float]:
    """What one training step of K replicas at per-replica batch B must do, whatever the
    implementation: the FLOPs of its matmuls and convolutions (forward and backward, counted
    by ``torch.utils.flop_counter`` on one model at batch K·B: the replicas do exactly this
    arithmetic) and the bytes it must move in fp32:

    - parameters (P per replica): read by the forward and by the backward's input gradients
      (2·K·P), gradients written (K·P), SGD with momentum reading parameter, gradient and
      momentum and writing parameter and momentum (5·K·P), the average every H steps
      reading and writing the parameters (2·K·P / H);
    - activations (A per sample: the outputs of the model's leaf modules): written and read
      once in the forward, read again by the backward, their gradients written and read
      (5·K·B·A), plus the input read once.

    ``working_set``: the distinct bytes the step touches (parameters, gradients, momentum,
    activations and their gradients), the size at which its bandwidth is measured.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model: nn.Module = workload.make_model(0)  # type: ignore[attr-defined]
    batch = make_batches(1, k * b, 1)[0]
    batch = {"x": batch["x"][0], "y": batch["y"][0]}
    outputs = [0]
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [
        m.register_forward_hook(lambda _m, _a, out: outputs.__setitem__(0, outputs[0] + out.numel()))
        for m in leaves
    ]
    with FlopCounterMode(display=False) as counter:
        workload.loss(model, batch).backward()  # type: ignore[attr-defined]
    for h in hooks:
        h.remove()
    conv = matmul = 0
    for op, flops in counter.get_flop_counts()["Global"].items():
        if "convolution" in str(op):
            conv += flops
        else:
            matmul += flops
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param_bytes = 4 * k * params * (2 + 1 + 5 + 2 / PERIOD)
    activation_bytes = 4 * (5 * outputs[0] + batch["x"].numel())
    return {
        "params": params,
        "activations_per_sample": outputs[0] / (k * b),
        "matmul_flops": matmul,
        "conv_flops": conv,
        "param_bytes": param_bytes,
        "activation_bytes": activation_bytes,
        "bytes": param_bytes + activation_bytes,
        "working_set": 4 * (3 * k * params + 2 * outputs[0]),
    }


def roofline_seconds(cost: dict[str, float], cpu: dict[str, float], gbs: float) -> float:
    """The step's time at the calibrated rates: its matmuls at the GEMM's rate, its
    convolutions at the convolution's, its bytes at ``gbs`` (the bandwidth at its working
    set), one after another (one thread runs the compute-bound kernels and the
    memory-bound ones in turn)."""
    return (
        cost["matmul_flops"] / (cpu["gemm_gflops"] * 1e9)
        + cost["conv_flops"] / (cpu["conv_gflops"] * 1e9)
        + cost["bytes"] / (gbs * 1e9)
    )


# -- throughput ---------------------------------------------------------------------------------


def timed(step: Step, batches: list, budget: float, cpu_clock: bool = False) -> Callable[[], float]:
    """One measurement of ``step``: seconds per step over whole periods of H steps (so the
    averaging is counted at its share), for at least ``budget`` seconds of wall time.
    ``cpu_clock``: the seconds are this process's CPU time, not the wall clock's (on a
    machine shared with other jobs, the time spent waiting for a core is left out)."""

    def run() -> float:
        steps, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while True:
            for _ in range(PERIOD):
                step(batches[steps % len(batches)])
                steps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                return ((time.process_time() - cpu_start) if cpu_clock else elapsed) / steps

    return run


def throughput(args: argparse.Namespace, cpu: dict[str, float]) -> tuple[list[dict], list[dict], list[list]]:
    """Per workload and K: the four variants interleaved; returns the ratios, the rows of
    the throughput table and those of the roofline table."""
    reps = 2 if args.quick else args.reps
    budget = 0.05 if args.quick else args.budget
    ratios: list[dict] = []
    rates: list[list] = []
    roof: list[list] = []
    for name in ("mnist1d_mlp", "mnist1d_cnn"):
        workload = workloads.build(name, num_samples=1000)
        for k in (4, 16, 64):
            batches = make_batches(k, args.batch, 4)
            runners = {
                "fused": simulated_runner(workload.make_model(0), k, workload.loss),
                "vmap": simulated_runner(workload.make_model(0), k, workload.loss, fused=False),
                "loop": loop_runner(lambda wl=workload: wl.make_model(0), k, workload.loss),
                "single": single_runner(workload.make_model(0), workload.loss),
            }
            t = interleaved(
                {kind: timed(run, batches, budget, args.clock == "cpu") for kind, run in runners.items()},
                reps,
                warmup=1,
            )
            labels = {"workload": name, "K": k}
            ratios += [
                ratio(
                    "fused/loop",
                    t["loop"],
                    t["fused"],
                    target=3 if name == "mnist1d_cnn" and k == 16 else None,
                    **labels,
                ),
                ratio(
                    "fused/single",
                    t["single"],
                    t["fused"],
                    target=0.8 if name == "mnist1d_mlp" and k >= 16 else None,
                    **labels,
                ),
                ratio("vmap/loop", t["loop"], t["vmap"], **labels),
                ratio("vmap/single", t["single"], t["vmap"], **labels),
            ]
            cost = step_cost(workload, k, args.batch)
            gbs = bandwidth(cost["working_set"])
            estimate = roofline_seconds(cost, cpu, gbs)
            ratios.append(
                ratio(
                    "fused time / roofline",
                    t["fused"],
                    [estimate] * len(t["fused"]),
                    target=1.3 if name == "mnist1d_mlp" and k >= 16 else None,
                    at_most=True,
                    **labels,
                )
            )
            samples = k * args.batch
            med = {kind: statistics.median(v) for kind, v in t.items()}
            rates.append([name, k, *(round(samples / med[kind]) for kind in runners)])
            roof.append(
                [
                    name,
                    k,
                    round(cost["matmul_flops"] / 1e6, 1),
                    round(cost["conv_flops"] / 1e6, 1),
                    round(cost["bytes"] / 1e6, 2),
                    round(cost["working_set"] / 1e6, 2),
                    round(gbs, 1),
                    round(estimate * 1e3, 3),
                    round(med["fused"] * 1e3, 3),
                    round(med["fused"] / estimate, 2),
                    round(med["single"] * 1e3, 3),
                ]
            )
            for r in ratios[-5:]:
                print(ratio_line(r), flush=True)
            print(
                f"  per step: {cost['matmul_flops'] / 1e6:.1f} matmul + {cost['conv_flops'] / 1e6:.1f} conv MFLOP, "
                f"{cost['bytes'] / 1e6:.1f} MB at {gbs:.1f} GB/s -> roofline {estimate * 1e3:.2f} ms; "
                f"fused {med['fused'] * 1e3:.2f} ms, single {med['single'] * 1e3:.2f} ms",
                flush=True,
            )
    return ratios, rates, roof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    parser.add_argument("--batch", type=int, default=32, help="B: per-replica batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=MIN_REPS, help="repetitions (after one warm-up)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of each measurement, at least")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time steps by the wall clock, or by this process's CPU time (a machine shared with other jobs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # What the simulated engine sets up for its process; one process here, so every variant
    # runs with it.
    retain_freed_memory()
    started = time.perf_counter()

    cpu = calibrate(args.quick)
    print(
        f"CPU, {args.threads} thread(s): GEMM {cpu['gemm_gflops']:.1f} GFLOP/s, convolution "
        f"{cpu['conv_gflops']:.1f} GFLOP/s, add {cpu['bandwidth_gbs']:.1f} GB/s",
        flush=True,
    )
    ratios, rates, roof = throughput(args, cpu)
    tables = [
        {
            "title": "Simulated engine: samples per second (medians)",
            "columns": ["workload", "K", "fused", "vmap", "loop", "single (batch K·B)"],
            "rows": rates,
            "note": f"One thread, per-replica batch {args.batch}, LocalSGD H = {PERIOD}; each figure the median of "
            f"{args.reps if not args.quick else 2} interleaved measurements of >= {args.budget} s"
            + (" (steps timed in CPU seconds of the process)." if args.clock == "cpu" else "."),
        },
        {
            "title": "Simulated engine: the fused step against this CPU's roofline",
            "columns": [
                "workload",
                "K",
                "matmul MFLOP",
                "conv MFLOP",
                "MB moved",
                "working set MB",
                "GB/s there",
                "roofline ms",
                "fused ms",
                "fused / roofline",
                "single ms",
            ],
            "rows": roof,
            "note": f"Per step. Calibration: GEMM {cpu['gemm_gflops']:.1f} GFLOP/s, convolution "
            f"{cpu['conv_gflops']:.1f} GFLOP/s, main memory {cpu['bandwidth_gbs']:.1f} GB/s; roofline = matmul FLOPs / "
            "GEMM rate + conv FLOPs / conv rate + bytes / the bandwidth of an add over the step's working set "
            "(docs/simulator.md).",
        },
    ]
    out = {
        "benchmark": "simulator",
        "command": "python benchmarks/simulator.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "batch": args.batch,
        "clock": args.clock,
        "calibration": cpu,
        "ratios": ratios,
        "tables": tables,
        "seconds": time.perf_counter() - started,
        "machine": machine_at_end(),
    }
    write_results("simulator", out, args.quick)


if __name__ == "__main__":
    main()
