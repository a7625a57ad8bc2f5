"""What a study pays per run besides training: a fresh launcher per run against worker pools.

The same short MNIST-1D runs (the demo's workload and recipe, cut to a few steps) go through
the process engine two ways, interleaved (each repetition runs both once, in an order
that alternates; ``--runs`` >= 5 repetitions) so that drift in the machine's load hits both
alike:

- ``fresh``: each run on processes of its own, as every run was before worker pools
  (``torchrun`` starts K processes that import torch, rendezvous, load the data, train,
  tear down): :meth:`ProcessesEngine.execute`;
- ``pool``: each run on a :class:`~localsgd.engines.launching.pool.LocalSession`, whose K processes
  and process group stay up from one run to the next, with the data already loaded.

A run's overhead is its wall time (from the study's side: recording, launching, waiting)
minus its training time (the record's ``wall_seconds``) minus its evaluations (their
count times one evaluation of the consensus model timed in this process, on the same
threads). The first pooled run of each K also starts the pool; it runs before the
repetitions and is reported apart. The ratio fresh / pool is taken within a repetition and
reported as median and range.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from shared import MIN_REPS, interleaved, machine_at_end, ratio, ratio_line, write_results

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


def way(
    runs: list[RunConfig], store: Store, session: Any, evaluation: float, measured: list[dict[str, float]]
) -> Callable[[], float]:
    """One measurement per call: the next run of ``runs``, its overhead in seconds (the whole
    record appended to ``measured``)."""

    def one() -> float:
        measured.append(measure(runs[len(measured)], store, session, evaluation))
        print(
            f"K={runs[0].workers} {'pool' if session else 'fresh'}: {measured[-1]}",
            file=sys.stderr,
            flush=True,
        )
        return measured[-1]["overhead"]

    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 2 only, 2 repetitions, 20 steps, no JSON")
    parser.add_argument("--runs", type=int, default=MIN_REPS, help=f"repetitions per K (default {MIN_REPS})")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run (default 50)")
    args = parser.parse_args()
    if not args.quick and args.runs < MIN_REPS:
        parser.error(f"--runs must be at least {MIN_REPS} (fewer only with --quick)")
    worker_counts = (2,) if args.quick else (2, 4)
    reps = 2 if args.quick else args.runs
    steps = 20 if args.quick else args.steps
    for var in LAUNCHER_VARS:
        os.environ.pop(var, None)
    os.environ["OMP_NUM_THREADS"] = "1"

    results: dict[str, Any] = {}
    ratios = []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in worker_counts:
            runs = [config(workers, seed, steps) for seed in range(reps + 1)]
            evaluation = evaluation_seconds(runs[0])
            stores = {
                "fresh": Store(Path(tmp) / f"fresh{workers}"),
                "pool": Store(Path(tmp) / f"pool{workers}"),
            }
            measured: dict[str, list[dict[str, float]]] = {"fresh": [], "pool": []}
            with PROCESSES.session() as session:
                # The pool's first run starts it: measured before the repetitions, apart.
                first = measure(runs[0], stores["pool"], session, evaluation)
                print(f"K={workers} pool, first run: {first}", file=sys.stderr, flush=True)
                ways = {
                    name: way(runs[1:], stores[name], way_session, evaluation, measured[name])
                    for name, way_session in (("fresh", None), ("pool", session))
                }
                overhead = interleaved(ways, reps)
            r = ratio("run overhead, fresh launcher / pool", overhead["fresh"], overhead["pool"], K=workers)
            ratios.append(r)
            train = statistics.mean(m["train"] for m in measured["fresh"] + measured["pool"])
            rows.append(
                [
                    workers,
                    f"{statistics.median(overhead['fresh']):.2f} [{min(overhead['fresh']):.2f}, {max(overhead['fresh']):.2f}]",
                    f"{first['overhead']:.2f}",
                    f"{statistics.median(overhead['pool']):.3f} [{min(overhead['pool']):.3f}, {max(overhead['pool']):.3f}]",
                    f"{r['median']:.0f} [{r['min']:.0f}, {r['max']:.0f}]",
                    f"{train:.2f}",
                ]
            )
            results[f"K={workers}"] = {
                "evaluation_seconds": evaluation,
                "pool_first": first,
                "runs": measured,
            }

    tables = [
        {
            "title": "Overhead per run (wall time less training and evaluations), median [min, max]",
            "columns": [
                "K", "fresh launcher (s)", "pool: first run, starting it (s)", "pool: later runs (s)",
                "fresh / pool", "training per run (s, mean)",
            ],
            "rows": rows,
            "note": (
                f"The demo's MNIST-1D CNN run cut to {steps} steps with one evaluation, process engine, "
                f"{reps} interleaved repetitions per K."
            ),
        }
    ]  # fmt: skip
    for row in rows:
        print(" | ".join(str(c) for c in row))
    for r in ratios:
        print(ratio_line(r))
    out = {
        "command": ["python", "benchmarks/study_throughput.py", *sys.argv[1:]],
        "quick": args.quick,
        "reps": reps,
        "steps": steps,
        "machine": machine_at_end(),
        "results": results,
        "ratios": ratios,
        "tables": tables,
    }
    write_results("study_throughput", out, args.quick)


if __name__ == "__main__":
    main()
