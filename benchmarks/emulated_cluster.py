"""Measured against predicted: seconds per step on emulated multi-node clusters against the
cost model's estimate for the calibrated cluster.

For each topology (2 nodes × 2 processes, 4 nodes × 1) and link rate (1 Gbit/s, 100 Mbit/s)
an emulated cluster is built (``localsgd.emulation``: network namespaces, links shaped with
tbf, one torchrun per node), its links are calibrated (α, β of a node-to-node link and of a
node's loopback, from gloo all-reduces), and every case runs on it through the trainer
every engine shares: two workloads (a communication-heavy MNIST-1D MLP of 5.1 M parameters
and the MNIST-1D CNN of 8 k) × mini-batch SGD, local SGD H ∈ {4, 16}, hierarchical local SGD
with blocks = nodes, H = 4, H_b ∈ {1, 4}. One torchrun launch runs all cases of a cluster
in turn (it saves a start-up per case); each case is a run with its own record.

Per case, from its record: measured seconds per step (training wall time / steps), split
into communication (the communicator's seconds, every scope) and the rest ("compute");
predicted communication per step from the run's own per-scope counters and the calibrated
cluster (``costmodel.comm_seconds``); predicted step = the run's measured compute +
predicted communication (what ``localsgd report --cluster`` does). Ratios: measured /
predicted step, and measured / predicted communication. A case is communication-bound when
the predicted communication is at least 75 % of the predicted step. Measured communication
includes the time a rank waits for slower peers inside a collective; every rank's counters
are gathered, and the rank that waited least (smallest total) bounds the transfer time
alone from above (``least m/p``: its communication / predicted). ``compute_alone`` is the
step time of one worker alone (no peers), for comparison: with 4 processes on 2 cores a
worker's compute is slower than that.

Nothing here is asserted: this is a measurement. Needs root (network namespaces).

    python benchmarks/emulated_cluster.py            # the full table (tens of minutes on 2 cores)
    python benchmarks/emulated_cluster.py --quick    # smoke run: one cluster, two cases
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
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
    steps_scale: int = 1
    """Multiplies every case's steps (more syncs per case)."""


QUICK = Plan(
    topologies=((2, 2),),
    rates=("100mbit",),
    workloads=("mlp",),
    algorithms=("minibatch", "hier_hb4"),
    mlp_width=1024,
    reps=3,
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

    cases = []
    for workload in plan.workloads:
        for algorithm in plan.algorithms:
            config = run_table(workload, algorithm, nodes * g, g, plan)
            cases.append({"run_dir": str(work / f"{nodes}x{g}-{rate}" / config["name"]), "config": config})
    plan_file = work / f"plan-{nodes}x{g}-{rate}.json"
    plan_file.write_text(json.dumps(cases))
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
    for case in cases:
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


def table(results: list[dict[str, Any]], alone: dict[str, float]) -> str:
    head = (
        f"{'cluster':>14} {'model':>4} {'algorithm':>10} {'step s':>8} {'comp s':>8} {'comm s':>8} "
        f"{'pred comm':>9} {'pred step':>9} {'step m/p':>8} {'comm m/p':>8} {'least m/p':>9}  bound"
    )
    lines = [head]
    for result in results:
        for r in result["cases"]:
            where = f"{r['nodes']}x{r['procs_per_node']} {r['rate']}"
            lines.append(
                f"{where:>14} {r['workload']:>4} {r['algorithm']:>10} {r['measured_step_s']:8.4f} "
                f"{r['measured_compute_step_s']:8.4f} {r['measured_comm_step_s']:8.4f} "
                f"{r['predicted_comm_step_s']:9.4f} {r['predicted_step_s']:9.4f} {r['ratio_step']:8.3f} "
                f"{r['ratio_comm']:8.3f} {r['ratio_comm_least_waiting']:9.3f}  {r['bound']}"
            )
    lines.append("one worker alone, s/step: " + ", ".join(f"{k} {v:.4f}" for k, v in alone.items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one cluster, two cases")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/)")
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
    plan = QUICK if args.quick else Plan()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="emulated-cluster-") as tmp:
        work = Path(tmp)
        tables = {w: run_table(w, "minibatch", 1, 1, plan) for w in plan.workloads}
        alone = compute_alone(tables, work)  # also generates the data sets before the workers start
        for nodes, g in plan.topologies:
            for rate in plan.rates:
                results.append(measure_cluster(nodes, g, rate, plan, work))
                print(table(results[-1:], alone), flush=True)
    out = args.out or RESULTS / ("emulated_cluster_quick.json" if args.quick else "emulated_cluster.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "emulated_cluster",
        "quick": args.quick,
        "plan": dataclasses.asdict(plan),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
        "compute_alone_step_s": alone,
        "clusters": results,
    }
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(table(results, alone))
    print(f"{time.perf_counter() - started:.0f} s; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
