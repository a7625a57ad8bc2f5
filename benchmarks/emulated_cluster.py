"""Measured against predicted: seconds per step on emulated multi-node clusters against the
cost model's estimate for the calibrated cluster.

For each topology (2 nodes × 2 processes, 4 nodes × 1) and link rate (1 Gbit/s, 100 Mbit/s)
an emulated cluster is built (``localsgd.emulation``: network namespaces, links shaped with
tbf, one torchrun per node), its links are calibrated (α, β of a node-to-node link and of a
node's loopback, from gloo all-reduces), and every case runs on it through the trainer
every engine shares: two workloads (a communication-heavy MNIST-1D MLP of 5.1 M parameters
and the MNIST-1D CNN of 8 k) × mini-batch SGD, local SGD H ∈ {4, 16}, hierarchical local SGD
with blocks = nodes, H = 4, H_b ∈ {1, 4}. One torchrun launch runs all cases of a cluster
in turn (it saves a start-up per case), interleaved: ``--repetitions`` (>= 5) repetitions,
each running every case once in an order that rotates, after a 2-step warm-up run; each
case's repetition is a run with its own record.

Per case, from its record: measured seconds per step (training wall time / steps), split
into communication (the communicator's seconds, every scope) and the rest ("compute");
predicted communication per step from the run's own per-scope counters and the calibrated
cluster (``costmodel.comm_seconds``); predicted step = the run's measured compute +
predicted communication (what ``localsgd report --cluster`` does). Ratios: measured /
predicted step, and measured / predicted communication, each taken within a repetition
and reported as median and range. A case is communication-bound when
the predicted communication is at least 75 % of the predicted step. Measured communication
includes the time a rank waits for slower peers inside a collective; every rank's counters
are gathered, and the rank that waited least (smallest total) bounds the transfer time
alone from above (``least m/p``: its communication / predicted). ``compute_alone`` is the
step time of one worker alone (no peers), for comparison: with 4 processes on 2 cores a
worker's compute is slower than that.

Nothing here is asserted: this is a measurement. Needs root (network namespaces).

    python benchmarks/emulated_cluster.py            # the full table (about 30 min on 2 cores)
    python benchmarks/emulated_cluster.py --topologies 2x2   # the 2 × 2 clusters only (about 15 min)
    python benchmarks/emulated_cluster.py --quick    # smoke run: one cluster, two cases
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared import MIN_REPS, machine_at_end, ratio, ratio_line, write_results

COMM_BOUND = 0.75
"""A case is communication-bound when predicted communication ≥ this share of its step."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the run measures; ``--quick`` swaps in :data:`QUICK`."""

    topologies: tuple[tuple[int, int], ...] = ((2, 2), (4, 1))
    rates: tuple[str, ...] = ("1gbit", "100mbit")
    workloads: tuple[str, ...] = ("mlp", "cnn")
    algorithms: tuple[str, ...] = ("minibatch", "local4", "local16", "hier_hb1", "hier_hb4")
    mlp_width: int = 2240
    batch: int = 8
    reps: int = 7
    """Calibration repetitions per message size."""
    repetitions: int = MIN_REPS
    """Repetitions of every case (interleaved)."""
    steps_scale: int = 1
    """Multiplies every case's steps (more syncs per case)."""


QUICK = Plan(
    topologies=((2, 2),),
    rates=("100mbit",),
    workloads=("mlp",),
    algorithms=("minibatch", "hier_hb4"),
    mlp_width=1024,
    reps=3,
    repetitions=2,
)

# name: (algorithm table, steps); steps give each case at least two global averages.
ALGORITHMS: dict[str, tuple[dict[str, Any], int]] = {
    "minibatch": ({"name": "minibatch_sgd"}, 8),
    "local4": ({"name": "local_sgd", "period": 4}, 16),
    "local16": ({"name": "local_sgd", "period": 16}, 32),
    "hier_hb1": ({"name": "hierarchical_local_sgd", "period": 4, "block_period": 1}, 16),
    "hier_hb4": ({"name": "hierarchical_local_sgd", "period": 4, "block_period": 4}, 32),
}


def workload_table(name: str, plan: Plan) -> dict[str, Any]:
    if name == "mlp":
        return {"name": "mnist1d_mlp", "num_samples": 4000, "width": plan.mlp_width}
    return {"name": "mnist1d_cnn", "num_samples": 4000}


def run_table(workload: str, algorithm: str, workers: int, procs_per_node: int, plan: Plan) -> dict[str, Any]:
    algo, steps = ALGORITHMS[algorithm]
    algo = dict(algo)
    if algo["name"] == "hierarchical_local_sgd":
        algo["block_size"] = procs_per_node  # a block per node
    steps *= plan.steps_scale
    return {
        "name": f"{workload}-{algorithm}",
        "workload": workload_table(workload, plan),
        "workers": workers,
        "device": "cpu",
        "algorithm": algo,
        "data": {"batch_size": plan.batch},
        "optimizer": {"lr": 0.05},
        "train": {"epochs": 100, "max_steps": steps, "eval_every": steps},
    }


# -- inside each worker process (under torchrun, on the emulated cluster) ----------------------


def worker(plan_file: str) -> int:
    """Train every case of ``plan_file`` in turn on this process group."""
    import torch.distributed as dist

    import localsgd
    from localsgd.run.config import run_config
    from localsgd.run.training import train

    info = localsgd.init_distributed(backend="gloo")
    try:
        for case in json.loads(Path(plan_file).read_text()):
            run_dir = Path(case["run_dir"]) if info.rank == 0 else None
            if run_dir is not None:
                run_dir.mkdir(parents=True, exist_ok=True)
            status = train(run_config(case["config"]), run_dir, info.rank, info.world_size, info.backend)
            # The record holds rank 0's counters; every rank's show who waited for whom.
            ranks: list[Any] = [None] * info.world_size
            assert status.counters is not None
            dist.all_gather_object(ranks, status.counters.by_scope)
            if run_dir is not None:
                (run_dir / "ranks.json").write_text(json.dumps(ranks))
    finally:
        localsgd.destroy_distributed()
    return 0


# -- the controller ----------------------------------------------------------------------------


def compute_alone(tables: dict[str, dict[str, Any]], work: Path) -> dict[str, float]:
    """Seconds per step of one worker alone, per workload (the same batch and steps)."""
    from localsgd.run.config import run_config
    from localsgd.run.training import train

    out = {}
    for workload, table in tables.items():
        run_dir = work / f"alone-{workload}"
        run_dir.mkdir(parents=True)
        # 32 steps, evaluated every 8: the first 8 (warm-up: allocations, first touches) left out.
        alone = {**table, "workers": 1, "algorithm": {"name": "minibatch_sgd"}}
        alone["train"] = {"epochs": 100, "max_steps": 32, "eval_every": 8}
        train(run_config(alone), run_dir, 0, 1)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[workload] = (rows[-1]["wall_seconds"] - rows[0]["wall_seconds"]) / (
            rows[-1]["step"] - rows[0]["step"]
        )
    return out


def measure_cluster(nodes: int, g: int, rate: str, plan: Plan, work: Path) -> dict[str, Any]:
    from localsgd.costmodel import cluster_to_dict, comm_seconds
    from localsgd.emulation import EmulatedCluster, calibrate

    configs = [
        run_table(workload, algorithm, nodes * g, g, plan)
        for workload in plan.workloads
        for algorithm in plan.algorithms
    ]
    where = work / f"{nodes}x{g}-{rate}"
    # A 2-step run first (first touches, allocations; left out), then the repetitions, each
    # running every case once in an order that rotates (as shared.interleaved does).
    warmup = {**configs[0], "train": {"epochs": 100, "max_steps": 2, "eval_every": 2}}
    runs = [{"run_dir": str(where / "warmup"), "config": warmup}]
    for r in range(plan.repetitions):
        shift = r % len(configs)
        for config in configs[shift:] + configs[:shift]:
            runs.append({"run_dir": str(where / config["name"] / f"rep{r}"), "config": config, "rep": r})
    plan_file = work / f"plan-{nodes}x{g}-{rate}.json"
    plan_file.write_text(json.dumps(runs))
    started = time.perf_counter()
    with EmulatedCluster(nodes, g, rate) as cluster:
        calibration = calibrate(cluster, reps=plan.reps)
        calibrated = time.perf_counter() - started
        codes = cluster.run(
            [str(Path(__file__).resolve()), "--worker", str(plan_file)],
            log_dir=work / f"logs-{nodes}x{g}-{rate}",
            timeout=3600,
        )
    if any(codes):
        logs = work / f"logs-{nodes}x{g}-{rate}"
        tail = "\n".join(p.read_text()[-3000:] for p in sorted(logs.glob("*.log")))
        raise RuntimeError(f"the cases on {nodes}x{g} {rate} failed ({codes}):\n{tail}")
    model = calibration.cluster
    rows = []
    for case in sorted(runs[1:], key=lambda c: (configs.index(c["config"]), c["rep"])):
        status = json.loads((Path(case["run_dir"]) / "status.json").read_text())
        counters = status["counters"]
        steps = status["steps"]
        wall, comm = status["wall_seconds"], counters["comm_seconds"]
        predicted_comm = comm_seconds(counters["by_scope"], nodes * g, model) / steps
        ranks = json.loads((Path(case["run_dir"]) / "ranks.json").read_text())
        # The rank that waited least: closest to the transfer time alone (module docstring).
        least = min(sum(c["seconds"] for c in rank.values()) for rank in ranks) / steps
        compute = (wall - comm) / steps
        predicted = compute + predicted_comm
        name = case["config"]["name"]
        rows.append(
            {
                "nodes": nodes,
                "procs_per_node": g,
                "rate": rate,
                "workload": name.split("-")[0],
                "algorithm": name.split("-", 1)[1],
                "rep": case["rep"],
                "steps": steps,
                "payload_bytes": counters["bytes"] / max(counters["collectives"], 1),
                "collectives": {s: c["collectives"] for s, c in counters["by_scope"].items()},
                "measured_step_s": wall / steps,
                "measured_compute_step_s": compute,
                "measured_comm_step_s": comm / steps,
                "measured_comm_by_scope_s": {
                    s: c["seconds"] / steps for s, c in counters["by_scope"].items()
                },
                "measured_comm_least_waiting_rank_step_s": least,
                "predicted_comm_step_s": predicted_comm,
                "predicted_step_s": predicted,
                "ratio_step": (wall / steps) / predicted,
                "ratio_comm": (comm / steps) / predicted_comm if predicted_comm > 0 else math.nan,
                "ratio_comm_least_waiting": least / predicted_comm if predicted_comm > 0 else math.nan,
                "bound": "communication" if predicted_comm >= COMM_BOUND * predicted else "compute",
            }
        )
    return {
        "cluster": cluster_to_dict(model),
        "calibration": calibration.as_dict(),
        "seconds": {"calibration": calibrated, "total": time.perf_counter() - started},
        "cases": rows,
    }


CLUSTER_LABEL = {"1gbit": "1 Gbit/s", "100mbit": "100 Mbit/s"}


def summarise(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    """Per case, its ratios over the repetitions and its row of the table."""
    ratios: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    for result in results:
        cases: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in result["cases"]:
            cases.setdefault((r["workload"], r["algorithm"]), []).append(r)
        for (workload, algorithm), reps in cases.items():
            first = reps[0]
            where = f"{first['nodes']}x{first['procs_per_node']} {CLUSTER_LABEL.get(first['rate'], first['rate'])}"
            labels = {"cluster": where, "workload": workload, "algorithm": algorithm}
            measured = [r["measured_step_s"] for r in reps]
            predicted = [r["predicted_step_s"] for r in reps]
            step = ratio("measured / predicted seconds per step", measured, predicted, **labels)
            ratios.append(step)
            bound = (
                "communication"
                if sum(r["bound"] == "communication" for r in reps) * 2 > len(reps)
                else "compute"
            )
            cells = [f"{step['median']:.3f} [{step['min']:.3f}, {step['max']:.3f}]"]
            if all(r["predicted_comm_step_s"] > 0 for r in reps):
                comm = ratio(
                    "measured / predicted communication",
                    [r["measured_comm_step_s"] for r in reps],
                    [r["predicted_comm_step_s"] for r in reps],
                    **labels,
                )
                least = ratio(
                    "least-waiting rank's / predicted communication",
                    [r["measured_comm_least_waiting_rank_step_s"] for r in reps],
                    [r["predicted_comm_step_s"] for r in reps],
                    **labels,
                )
                if bound == "communication":
                    ratios += [comm, least]
                cells += [
                    f"{comm['median']:.2f}",
                    f"{least['median']:.2f} [{least['min']:.2f}, {least['max']:.2f}]",
                ]
            else:
                cells += ["", ""]
            med = statistics.median
            rows.append(
                [
                    where, workload.upper(), algorithm, len(reps),
                    f"{med(measured):.4f}", f"{med(r['measured_compute_step_s'] for r in reps):.4f}",
                    f"{med(r['measured_comm_step_s'] for r in reps):.4f}",
                    f"{med(r['predicted_comm_step_s'] for r in reps):.4f}", f"{med(predicted):.4f}",
                    *cells, bound,
                ]
            )  # fmt: skip
    return ratios, rows


COLUMNS = [
    "cluster", "model", "algorithm", "repetitions", "measured s/step", "compute", "comm",
    "predicted comm", "predicted s/step", "measured / predicted", "comm: measured / predicted",
    "least", "bound",
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one cluster, two cases")
    parser.add_argument("--topologies", nargs="+", metavar="NxG", help="e.g. 2x2 4x1 (default: both)")
    parser.add_argument("--rates", nargs="+", help="link rates, e.g. 1gbit 100mbit (default: both)")
    parser.add_argument("--workloads", nargs="+", choices=["mlp", "cnn"], help="default: both")
    parser.add_argument(
        "--repetitions", type=int, default=MIN_REPS, help=f"repetitions of every case (default {MIN_REPS})"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    from localsgd.emulation import unavailable

    why = unavailable()
    if why is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.quick:
        plan = QUICK
    else:
        if args.repetitions < MIN_REPS:
            parser.error(f"--repetitions must be at least {MIN_REPS} (fewer only with --quick)")
        changes: dict[str, Any] = {"repetitions": args.repetitions}
        if args.topologies:
            try:
                changes["topologies"] = tuple(tuple(int(n) for n in t.split("x")) for t in args.topologies)
            except ValueError:
                parser.error(f"--topologies: {args.topologies} are not all NxG (nodes x processes per node)")
        if args.rates:
            changes["rates"] = tuple(args.rates)
        if args.workloads:
            changes["workloads"] = tuple(args.workloads)
        plan = dataclasses.replace(Plan(), **changes)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="emulated-cluster-") as tmp:
        work = Path(tmp)
        tables = {w: run_table(w, "minibatch", 1, 1, plan) for w in plan.workloads}
        alone = compute_alone(tables, work)  # also generates the data sets before the workers start
        for nodes, g in plan.topologies:
            for rate in plan.rates:
                results.append(measure_cluster(nodes, g, rate, plan, work))
                for r in summarise(results[-1:])[0]:
                    print(ratio_line(r), flush=True)
    ratios, rows = summarise(results)
    full = Plan()
    reduced = [
        f"{field.name} {getattr(plan, field.name)}"
        for field in dataclasses.fields(Plan)
        if field.name != "repetitions" and getattr(plan, field.name) != getattr(full, field.name)
    ]
    note = (
        "Seconds per step, medians over the repetitions; measured / predicted and least: median "
        "[min, max]. least: the communication of the rank that waited least, over the prediction. "
        "Compute of one worker alone (s/step): "
        + ", ".join(f"{k.upper()} {v:.4f}" for k, v in alone.items())
        + ". A case is communication-bound when the predicted communication is at least "
        f"{COMM_BOUND:.0%} of its predicted step; measured and predicted compute are the same by "
        "construction, so compute-bound cases test the model little."
    )
    if reduced and not args.quick:
        note += (
            " A reduced run (the full plan has every topology, rate and workload): "
            + "; ".join(reduced)
            + "."
        )
    tables = [
        {"title": "Measured against predicted, per case", "columns": COLUMNS, "rows": rows, "note": note}
    ]
    for row in rows:
        print(" | ".join(str(c) for c in row))
    payload = {
        "command": ["python", "benchmarks/emulated_cluster.py", *sys.argv[1:]],
        "quick": args.quick,
        "plan": dataclasses.asdict(plan),
        "machine": machine_at_end(),
        "seconds": time.perf_counter() - started,
        "compute_alone_step_s": alone,
        "clusters": results,
        "ratios": ratios,
        "tables": tables,
    }
    write_results("emulated_cluster", payload, args.quick)
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
