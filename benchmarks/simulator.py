"""How fast the simulated engine trains K replicas against its reference points.

Throughput: for the MNIST-1D MLP and CNN at K = 4, 16, 64 replicas of per-replica batch B,
one process, the same thread count for all, each timed over the same number of steps,
interleaved:

- ``fused``: :class:`~localsgd.engines.simulated.engine.StackedModel` with the fused stacked
  layers (batched matmuls, grouped convolutions, per-replica BatchNorm in one kernel) + one
  optimizer over the stacked tensors, inside ``DataParallel`` with ``LocalSGD(H=8)`` and
  the simulated communicator (what ``engine = "simulated"`` runs);
- ``vmap``: the same with ``vmap(grad)`` (the fallback for other modules);
- ``loop``: K model copies and K optimizers stepped one after another, averaged every 8
  steps (how simulations are usually written);
- ``single``: one model trained at batch K·B. The replicas do the same arithmetic, so this
  is the physical limit of any batched simulation.

Throughput is samples per second (K·B per step). Ratios are of medians over repetitions.
Nothing is asserted: this is a measurement.

    python benchmarks/simulator.py           # full run, a few minutes
    python benchmarks/simulator.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import localsgd
from localsgd import algorithms, workloads
from localsgd.engines.simulated.engine import ReplicaGradients, SimulatedCommunicator, StackedModel

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


def measure(step: Callable, batches: list, steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    parser.add_argument("--batch", type=int, default=32, help="B: per-replica batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps, budget = (2, 0.5) if args.quick else (5, 2.0)
    out = args.out or Path(__file__).parent / "results" / (
        "simulator.quick.json" if args.quick else "simulator.json"
    )

    results = []
    header = (
        f"{'workload':12} {'K':>3} {'fused samp/s':>12} {'vmap samp/s':>11} {'loop samp/s':>11} "
        f"{'single samp/s':>13} {'fused/loop':>10} {'fused/single':>12} {'vmap/loop':>9} {'vmap/single':>11}"
    )
    print(header)
    print("-" * len(header))
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
            # Calibrate the step count on the slowest (the loop) so each rep takes ~budget s.
            for run in runners.values():
                measure(run, batches, 3)  # warm-up
            per_step = measure(runners["loop"], batches, 3) / 3
            steps = max(PERIOD, int(budget / max(per_step, 1e-6)))
            times: dict[str, list[float]] = {kind: [] for kind in runners}
            for rep in range(reps):
                shift = rep % len(runners)
                order = list(runners)[shift:] + list(runners)[:shift]
                for kind in order:
                    times[kind].append(measure(runners[kind], batches, steps))
            samples = steps * k * args.batch
            rate = {kind: samples / statistics.median(t) for kind, t in times.items()}
            row = {
                "workload": name,
                "replicas": k,
                "batch": args.batch,
                "steps": steps,
                "samples_per_second": rate,
                "fused_over_loop": rate["fused"] / rate["loop"],
                "fused_over_single": rate["fused"] / rate["single"],
                "vmap_over_loop": rate["vmap"] / rate["loop"],
                "vmap_over_single": rate["vmap"] / rate["single"],
                "fused_over_vmap": rate["fused"] / rate["vmap"],
            }
            results.append(row)
            print(
                f"{name:12} {k:>3} {rate['fused']:>12.0f} {rate['vmap']:>11.0f} {rate['loop']:>11.0f} "
                f"{rate['single']:>13.0f} {row['fused_over_loop']:>10.2f} {row['fused_over_single']:>12.2f} "
                f"{row['vmap_over_loop']:>9.2f} {row['vmap_over_single']:>11.2f}",
                flush=True,
            )
    print("targets: fused/loop >= 3 at K = 16; fused/single >= 0.8 at K >= 16")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "simulator",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "results": results,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
