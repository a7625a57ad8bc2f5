"""What a study pays per run besides training: a fresh launcher per run against worker pools.

The same short MNIST-1D runs (the demo's workload and recipe, cut to a few steps) go through
the process engine two ways, interleaved run by run so that drift in the machine's load
hits both alike:

- ``fresh``: each run on processes of its own, as every run was before worker pools
  (``torchrun`` starts K processes that import torch, rendezvous, load the data, train,
  tear down): :meth:`ProcessesEngine.execute`;
- ``pool``: each run on a :class:`~localsgd.engines.launching.pool.LocalSession`, whose K processes
  and process group stay up from one run to the next, with the data already loaded.

A run's overhead is its wall time (from the study's side: recording, launching, waiting)
minus its training time (the record's ``wall_seconds``) minus its evaluations (their
count times one evaluation of the consensus model timed in this process, on the same
threads). The first pooled run of each K also starts the pool; it is reported apart.
Nothing here is asserted: this is a measurement, not a test.

    python benchmarks/study_throughput.py            # K = 2 and 4, 5 runs each
    python benchmarks/study_throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from shared import machine_at_end, write_results

from localsgd import workloads
from localsgd.engines.processes.engine import PROCESSES
from localsgd.records import Store
from localsgd.records.record import read_metrics
from localsgd.run.config import RunConfig, run_config
from localsgd.run.execute import execute_run

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def config(workers: int, seed: int, steps: int) -> RunConfig:
    """The demo's run (studies/demo.toml), cut to ``steps`` steps with one evaluation."""
    return run_config(
        {
            "workers": workers,
            "seed": seed,
            "device": "cpu",
            "threads": 1,
            "workload": {"name": "mnist1d_cnn", "num_samples": 20000},
            "algorithm": {"name": "local_sgd", "period": 4},
            "data": {"batch_size": 64},
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
            "schedule": {"name": "cosine"},
            "train": {"epochs": 5, "max_steps": steps, "eval_every": steps},
        }
    )


def evaluation_seconds(run: RunConfig, reps: int = 5) -> float:
    """One evaluation of the run's model, timed here on one thread (median)."""
    workload = workloads.build(run.workload)
    model = workload.make_model(run.seed)
    torch.set_num_threads(run.threads)
    device = torch.device("cpu")
    workload.evaluate(model, device)  # warm-up: caches the test tensors
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        workload.evaluate(model, device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(run: RunConfig, store: Store, session: Any, evaluation: float) -> dict[str, float]:
    start = time.perf_counter()
    status = execute_run(run, store, session=session)
    wall = time.perf_counter() - start
    info = store.final_status(run.run_id())
    if status != "completed" or info is None:
        raise RuntimeError(f"run {run.run_id()} {status}: {store.error(run.run_id())}")
    evaluations = len(read_metrics(store.run_dir(run.run_id()) / "metrics.jsonl"))
    train = info.wall_seconds
    return {
        "wall": wall,
        "train": train,
        "evaluate": evaluations * evaluation,
        "overhead": wall - train - evaluations * evaluation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 2 only, 2 runs, 20 steps")
    parser.add_argument("--runs", type=int, default=5, help="runs per K and way (default 5)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run (default 50)")
    args = parser.parse_args()
    worker_counts = (2,) if args.quick else (2, 4)
    runs_per_k = 2 if args.quick else args.runs
    steps = 20 if args.quick else args.steps
    for var in LAUNCHER_VARS:
        os.environ.pop(var, None)
    os.environ["OMP_NUM_THREADS"] = "1"

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in worker_counts:
            runs = [config(workers, seed, steps) for seed in range(runs_per_k)]
            evaluation = evaluation_seconds(runs[0])
            fresh, pooled = Store(Path(tmp) / f"fresh{workers}"), Store(Path(tmp) / f"pool{workers}")
            rows: dict[str, list[dict[str, float]]] = {"fresh": [], "pool": []}
            with PROCESSES.session() as session:
                for i, run in enumerate(runs):
                    # Alternate which way goes first, so neither always follows the other.
                    order = ("fresh", "pool") if i % 2 == 0 else ("pool", "fresh")
                    for way in order:
                        if way == "fresh":
                            rows["fresh"].append(measure(run, fresh, None, evaluation))
                        else:
                            rows["pool"].append(measure(run, pooled, session, evaluation))
                        print(f"K={workers} run {i} {way}: {rows[way][-1]}", file=sys.stderr, flush=True)
            results[f"K={workers}"] = {"evaluation_seconds": evaluation, "runs": rows}

    table = [
        "| K | fresh launcher: overhead per run (s) | pool: first run, starting it (s) | pool: later runs (s) | fresh / pool (later runs) | training per run (s) |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for key, result in results.items():
        fresh = [r["overhead"] for r in result["runs"]["fresh"]]
        pool = [r["overhead"] for r in result["runs"]["pool"]]
        train = statistics.mean(r["train"] for r in result["runs"]["fresh"] + result["runs"]["pool"])
        later = pool[1:]
        summary[key] = {
            "fresh_mean": statistics.mean(fresh),
            "fresh_median": statistics.median(fresh),
            "pool_first": pool[0],
            "pool_later_mean": statistics.mean(later),
            "pool_later_median": statistics.median(later),
            "ratio_mean": statistics.mean(fresh) / statistics.mean(later),
            "train_mean": train,
        }
        s = summary[key]
        table.append(
            f"| {key[2:]} | {s['fresh_mean']:.2f} (median {s['fresh_median']:.2f}) | {s['pool_first']:.2f} | "
            f"{s['pool_later_mean']:.3f} (median {s['pool_later_median']:.3f}) | {s['ratio_mean']:.0f}x | {train:.2f} |"
        )
    print("\n".join(table))
    machine = machine_at_end()
    out = {
        "command": ["python", "benchmarks/study_throughput.py", *sys.argv[1:]],
        "quick": args.quick,
        "runs_per_k": runs_per_k,
        "steps": steps,
        "machine": machine,
        "summary": summary,
        "table": table,
        "results": results,
    }
    write_results("study_throughput", out, args.quick)


if __name__ == "__main__":
    main()
