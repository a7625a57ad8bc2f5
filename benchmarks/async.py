"""Updates per second of asynchronous training against synchronous mini-batch SGD, and where
a parameter server becomes the bottleneck.

The same short MNIST-1D runs (the MLP of studies/async.toml, a fixed number of steps per
worker, one evaluation at the end) go through three ways of training, interleaved (each
repetition runs every way once, in an order that rotates, one warm-up repetition dropped;
``--reps`` >= 5 repetitions) so that drift in the machine's load hits all alike:

- ``minibatch_sgd`` at K = 1, 2, 4 worker processes (synchronous: one update per step of
  all K, an all-reduce each);
- ``hogwild`` with P = 1, 2, 4 processes on one model in shared memory (each process's step
  is an update of the shared model);
- ``async_local_sgd`` with H = 1 (asynchronous SGD) at K = 2, 4 on a parameter server in
  rank 0's process (each push is an update).

Updates per second is each run's own ``updates_per_second`` at its last evaluation (updates
of the evaluated model over training wall time); the ratios, against mini-batch SGD of
one process and of the same process count, are taken within a repetition and reported as
median and range. The server's own time per update is timed here
for the MLP and for larger flat models: one push applied and the fresh model copied out
(:class:`~localsgd.algorithms.async_server.ParameterServer`, no transport). K workers of
step time t pushing every H steps keep a server of t_s per update busy K·t_s/(H·t) of the
time: it becomes the bottleneck from K* = H·t/t_s workers. Nothing here is asserted: this
is a measurement, not a test.

    python benchmarks/async.py            # 5 repetitions of 150 steps per worker
    python benchmarks/async.py --quick    # smoke run
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
from shared import MIN_REPS, interleaved, machine_at_end, ratio, ratio_line, write_results

from localsgd import workloads
from localsgd.algorithms.async_server import ParameterServer, ServerOptions
from localsgd.records import Store
from localsgd.records.record import read_metrics
from localsgd.run.config import RunConfig, run_config
from localsgd.run.execute import execute_run

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WORKLOAD = {"name": "mnist1d_mlp", "num_samples": 8000}
WAYS: list[tuple[str, str, int, dict[str, Any], dict[str, Any]]] = [
    # (label, engine, workers, engine options, algorithm)
    ("minibatch_sgd K=1", "processes", 1, {}, {"name": "minibatch_sgd"}),
    ("minibatch_sgd K=2", "processes", 2, {}, {"name": "minibatch_sgd"}),
    ("minibatch_sgd K=4", "processes", 4, {}, {"name": "minibatch_sgd"}),
    ("hogwild P=1", "hogwild", 1, {"procs_per_device": 1}, {"name": "minibatch_sgd"}),
    ("hogwild P=2", "hogwild", 2, {"procs_per_device": 2}, {"name": "minibatch_sgd"}),
    ("hogwild P=4", "hogwild", 4, {"procs_per_device": 4}, {"name": "minibatch_sgd"}),
    ("async SGD K=2", "processes", 2, {}, {"name": "async_local_sgd", "period": 1}),
    ("async SGD K=4", "processes", 4, {}, {"name": "async_local_sgd", "period": 1}),
]


def config(
    engine: str, workers: int, options: dict[str, Any], algorithm: dict[str, Any], seed: int, steps: int
) -> RunConfig:
    return run_config(
        {
            "workers": workers,
            "engine": engine,
            "engine_options": options,
            "seed": seed,
            "device": "cpu",
            "threads": 1,
            "workload": WORKLOAD,
            "algorithm": algorithm,
            "data": {"batch_size": 32},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "train": {"epochs": 100, "max_steps": steps, "eval_every": steps},
        }
    )


def updates_per_second(run: RunConfig, store: Store) -> dict[str, float]:
    status = execute_run(run, store)
    if status != "completed":
        raise RuntimeError(f"run {run.run_id()} {status}: {store.error(run.run_id())}")
    last = read_metrics(store.run_dir(run.run_id()) / "metrics.jsonl")[-1]
    assert last.updates is not None and last.updates_per_second is not None
    return {
        "updates": float(last.updates),
        "updates_per_second": last.updates_per_second,
        "wall": last.wall_seconds,
    }


def server_seconds(params: list[torch.Tensor], workers: int, reps: int) -> float:
    """Median seconds of one push applied and the model copied back, K workers pushing in
    turn with H = 1 (each push one update, staleness K − 1 once running)."""
    server = ParameterServer(params, workers, ServerOptions())
    out = [p.clone() for p in params]
    pushed = [p + 0.001 for p in params]
    times = []
    for i in range(reps + workers):
        k = i % workers
        start = time.perf_counter()
        server.push(k, pushed)
        server.model(out, k)
        times.append(time.perf_counter() - start)
    return statistics.median(times[workers:])  # after every worker's first push


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions of 30 steps, no warm-up, no JSON")
    parser.add_argument(
        "--reps", type=int, default=MIN_REPS, help=f"repetitions of every way (default {MIN_REPS})"
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps per worker (default 150)")
    args = parser.parse_args()
    if not args.quick and args.reps < MIN_REPS:
        parser.error(f"--reps must be at least {MIN_REPS} (fewer only with --quick)")
    reps = 2 if args.quick else args.reps
    steps = 30 if args.quick else args.steps
    for var in LAUNCHER_VARS:
        os.environ.pop(var, None)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

    measured: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")

        def way(label: str, engine: str, workers: int, options: dict[str, Any], algorithm: dict[str, Any]):  # type: ignore[no-untyped-def]
            def measure() -> float:
                # A seed per call: every run is a new record (warm-up included).
                run = config(engine, workers, options, algorithm, len(measured[label]), steps)
                measured[label].append(updates_per_second(run, store))
                print(f"{label}: {measured[label][-1]}", file=sys.stderr, flush=True)
                return measured[label][-1]["updates_per_second"]

            return measure

        rates = interleaved({w[0]: way(*w) for w in WAYS}, reps, warmup=0 if args.quick else 1)

    one = rates["minibatch_sgd K=1"]
    ratios = []
    rows = []
    for label, _engine, workers, _, _ in WAYS:
        same = f"minibatch_sgd K={workers}"
        to_one = ratio("updates/s / mini-batch SGD K=1", rates[label], one, way=label)
        to_same = ratio("updates/s / mini-batch SGD, same processes", rates[label], rates[same], way=label)
        if label != "minibatch_sgd K=1":
            ratios.append(to_one)
        if label != same and workers > 1:  # with one process the two ratios coincide
            ratios.append(to_same)
        updates = statistics.mean(m["updates"] for m in measured[label][-reps:])
        rows.append(
            [
                label,
                workers,
                f"{updates:.0f}",
                f"{statistics.median(rates[label]):.0f} [{min(rates[label]):.0f}, {max(rates[label]):.0f}]",
                f"{to_one['median']:.2f} [{to_one['min']:.2f}, {to_one['max']:.2f}]",
                f"{to_same['median']:.2f} [{to_same['min']:.2f}, {to_same['max']:.2f}]",
            ]
        )

    # The server: its time per update against a worker's step time (one process's own).
    step = 1.0 / statistics.median(one)
    workload = workloads.build(WORKLOAD)
    sizes = {"MNIST-1D MLP": [p.detach() for p in workload.make_model(0).parameters()]}
    for n in (10**6, 10**7):
        sizes[f"flat {n // 10**6}M"] = [torch.zeros(n)]
    servers: dict[str, Any] = {}
    server_rows = []
    for name, params in sizes.items():
        count = sum(p.numel() for p in params)
        t = server_seconds(params, 4, 20 if args.quick else 200)
        servers[name] = {
            "parameters": count,
            "server_seconds_per_update": t,
            "server_updates_per_second": 1 / t,
        }
        row: list[Any] = [name, count, f"{t:.2e}", f"{1 / t:.0f}", "", ""]
        if name == "MNIST-1D MLP":  # K* needs the step time of the same model
            servers[name].update(k_star_h1=step / t, k_star_h4=4 * step / t)
            row[4:] = [f"{step / t:.0f}", f"{4 * step / t:.0f}"]
        server_rows.append(row)

    tables = [
        {
            "title": "Updates per second, median [min, max] over the repetitions",
            "columns": [
                "way", "processes", "updates per run", "updates/s",
                "/ mini-batch SGD K=1", "/ mini-batch SGD, same processes",
            ],
            "rows": rows,
            "note": (
                f"MNIST-1D MLP, {steps} steps per worker, batch 32, {reps} interleaved repetitions"
                + ("" if args.quick else " after one warm-up")
                + f". A worker's step (mini-batch SGD K=1, median): {step * 1e3:.2f} ms."
            ),
        },
        {
            "title": "The parameter server's own time per update",
            "columns": ["model", "parameters", "server s per update (K=4)", "server's most updates/s", "K* at H=1", "K* at H=4"],
            "rows": server_rows,
            "note": (
                "One push applied and the model copied back, no transport; median of "
                f"{20 if args.quick else 200} updates. K* = H·t/t_s, t the worker's step above: "
                "the worker count from which the server is the bottleneck."
            ),
        },
    ]  # fmt: skip
    for t in tables:
        print(f"\n{t['title']}")
        for r in t["rows"]:
            print("  " + " | ".join(str(c) for c in r))
    print()
    for r in ratios:
        print(ratio_line(r))
    out = {
        "command": ["python", "benchmarks/async.py", *sys.argv[1:]],
        "quick": args.quick,
        "reps": reps,
        "steps": steps,
        "machine": machine_at_end(),
        "step_seconds": step,
        "server": servers,
        "measured": measured,
        "ratios": ratios,
        "tables": tables,
    }
    write_results("async", out, args.quick)


if __name__ == "__main__":
    main()
