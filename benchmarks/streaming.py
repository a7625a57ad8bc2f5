"""Streaming and compressed synchronization on a slow link: the measured step time of local SGD
and DiLoCo, plain, with fragments + overlap and with int8 / 4-bit codecs, each beside the cost
model's prediction, and the share of the network wait that overlap hides.

The case is communication-bound by construction: a synthetic MLP (2.1 M parameters, 8.4 MB
in fp32) trained by K = 2 gloo processes with period H = 8, over a link whose transfer of
one sync takes ``--share`` (0.75) of a period's compute, i.e. about 6 steps, so a plain run
spends about as long waiting for the network as computing. (Overlap cannot hide more than
τ·F steps of compute per period, τ ≤ H/F: at most 1/share of the wait; 0.75 leaves it room.)
The link is either

- ``emulated`` (root): two network namespaces joined by links shaped with ``tc tbf``
  (``localsgd.emulation``), one process per node, the rate chosen from the compute of one
  step measured first (model bytes / (share · H · step compute), in Mbit/s); or
- ``delay`` (no root needed): the processes on this machine's loopback, and an injected
  ``comm.delay`` of share · H · step compute seconds on every world collective (the
  communicator starts it with the collective, so overlapped compute hides it as it would
  hide a slow transfer). The delay is per collective, not per byte: a codec's rows there
  check the machinery only, since compression cannot shorten it.

In the same launch the link is calibrated first, as ``benchmarks/emulated_cluster.py`` does
(gloo all-reduces of growing payloads through the communicator, ``emulation.fit_link``:
α and β of the cost model's ring; probed again, up to 3 times, while the fit's median
relative error exceeds 10 %, every attempt's error kept in the JSON), then every case runs ``--repetitions`` times, interleaved
(``shared.interleaved``: each repetition runs every case once, in an order that rotates,
after one warm-up repetition). A case's repetition: a fresh model and ``DataParallel``;
one period of warm-up steps, then a window of 4 periods (32 steps), timed on every rank.
Within the window, per rank: the step time (wall / steps), the time the steps waited for the
network (the communicator's seconds: a blocking average's whole collective, an overlapped
average's ``wait``), and the counters (collectives, bytes; a codec's all-gathers apart).
A step's time and wait are the mean over ranks.

Predicted, per case and repetition: the run's measured compute per step (step − wait) plus
``costmodel.comm_seconds`` of the window's counters on the calibrated link (with the
injected delay, and with each overlapped average hiding τ steps of that compute), per step:
what ``localsgd report --cluster`` does. The ratios: measured / predicted step (wanted within
0.85–1.15, two one-sided targets), and the hidden fraction of a streamed case, 1 − its wait /
the wait of the same algorithm plain, in the same repetition (wanted ≥ 0.70). The codec
cases (int8 and 4-bit, error feedback on; blocking, as a codec is not streamed) send an
all-gather of their payload, which the cost model prices, and encode, decode and average on
every rank, which it prices too: per-value costs calibrated in the same launch, before the
cases (``comm.codecs.measure_codec``, every rank at once, as ``localsgd cluster calibrate``
does), times the run's counters of values encoded and decoded. Beside the ratio: the codec's
work as the run timed it against the calibration, and the rest of the wait against the
cost model's transfer.

Nothing here is asserted: this is a measurement. Absolute figures on a shared machine are
noisy; the JSON records the load average.

    python benchmarks/streaming.py                # emulated slow link (root), about 4 min on 2 busy cores
    python benchmarks/streaming.py --link delay   # injected comm.delay instead (no root)
    python benchmarks/streaming.py --quick        # smoke run: tiny model, injected delay, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from shared import MIN_REPS, interleaved, machine_at_end, ratio, ratio_line, run_ranks, write_results
from torch import nn

log = logging.getLogger("streaming")

HIDDEN_TARGET = 0.70
"""The share of the plain run's network wait that overlap must hide."""
BAND = (0.85, 1.15)
"""Measured / predicted step time, wanted within this band."""
CALIBRATION_ERROR = 0.10
"""The link's fit is kept when its median relative error is at most this."""
CALIBRATION_TRIES = 3
"""Probes of the link at most (the last fit is kept whatever its error)."""
CODEC_KEYS = ("encoded", "decoded", "codec_seconds")
"""A scope's counters of a codec's own work (``CommStats``)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the run measures; ``--quick`` swaps in :data:`QUICK`."""

    workers: int = 2
    width: int = 1024
    depth: int = 2
    batch: int = 32
    period: int = 8
    periods: int = 4
    """Periods in the timed window of each case (after one period of warm-up)."""
    repetitions: int = MIN_REPS
    warmup: int = 1
    """Warm-up repetitions of every case (dropped)."""
    share: float = 0.75
    """One full-model sync's transfer (or injected delay) over one period's compute."""
    calibration_reps: int = 5
    codecs: tuple[str, ...] = ("int8", "int4")


QUICK = Plan(width=96, depth=2, batch=8, period=4, periods=2, repetitions=2, warmup=0, calibration_reps=2)


FAMILIES = (("local_sgd", "sgd", True), ("diloco", "adamw", False))
"""Each algorithm measured: its registered name, its inner optimizer (DiLoCo's is AdamW, as
in Douillard et al. 2023; local SGD's SGD with momentum), and whether it also runs F = 1,
τ = H."""


def cases(plan: Plan, codecs: bool) -> dict[str, dict[str, Any]]:
    """Case name → ``{"algorithm": table, "inner": optimizer}``. Streamed: F = 2 with τ = H/F
    (each half of the model in flight for half a period), and F = 1 with τ = H (the whole
    model in flight a whole period)."""
    h = plan.period
    out: dict[str, dict[str, Any]] = {}
    for algo, inner, whole in FAMILIES:
        base = {"name": algo, "period": h}
        variants = {algo: base, f"{algo} F=2 τ={h // 2}": {**base, "fragments": 2, "overlap": h // 2}}
        if whole:
            variants[f"{algo} F=1 τ={h}"] = {**base, "overlap": h}
        if codecs:
            for codec in plan.codecs:
                variants[f"{algo} {codec}"] = {**base, "compression": {"codec": codec}}
        out.update({name: {"algorithm": table, "inner": inner} for name, table in variants.items()})
    return out


def plain_of(case: str) -> str:
    return case.split(" ")[0]


def overlap_of(case: dict[str, Any]) -> int:
    return int(case["algorithm"].get("overlap", 0))


def has_compression() -> bool:
    from localsgd.algorithms import LocalSGD

    return any(f.name == "compression" for f in dataclasses.fields(LocalSGD))


# -- the model and one step ----------------------------------------------------------------------


def build_model(plan: Plan) -> nn.Module:
    torch.manual_seed(0)  # every rank starts equal (DataParallel broadcasts rank 0's anyway)
    layers: list[nn.Module] = []
    for _ in range(plan.depth):
        layers += [nn.Linear(plan.width, plan.width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(plan.width, 10))


def batches(plan: Plan, rank: int, count: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A pool of this rank's batches (drawn once, so drawing is not timed): inputs from
    N(0, 1), labels from a fixed random linear teacher, so the loss is learnable."""
    g = torch.Generator().manual_seed(1000 + rank)
    teacher = torch.randn(plan.width, 10, generator=torch.Generator().manual_seed(7))
    out = []
    for _ in range(count):
        x = torch.randn(plan.batch, plan.width, generator=g)
        out.append((x, (x @ teacher).argmax(1)))
    return out


def make_optimizer(inner: str, model: nn.Module) -> torch.optim.Optimizer:
    if inner == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)


def codec_of(case: dict[str, Any]) -> str | None:
    compression = case["algorithm"].get("compression")
    return None if compression is None else str(compression["codec"])


def codec_costs(plan: Plan, codecs: list[str]) -> dict[str, list[float]]:
    """This rank's (encode, decode) seconds per value of each codec, as ``localsgd cluster
    calibrate`` measures them (``comm.codecs.measure_codec``: exchanges with no transfer, at
    the model's size). Every rank measures at once, after a barrier, as the ranks encode
    and decode at once in a run."""
    import torch.distributed as dist

    from localsgd.comm.codecs import Compression, measure_codec

    n = sum(p.numel() for p in build_model(plan).parameters())
    out = {}
    for codec in codecs:
        dist.barrier()
        out[codec] = list(measure_codec(Compression(codec=codec), n))
    return out


def compute_alone(plan: Plan, steps: int = 24) -> float:
    """Median seconds of one training step of one process alone (no peers, no sync)."""
    model = build_model(plan)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    pool = batches(plan, 0)
    times = []
    for i in range(steps):
        x, y = pool[i % len(pool)]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[steps // 4 :])


# -- inside each worker process ------------------------------------------------------------------


def scope_delta(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Counters of the window: every numeric key of every scope, after − before."""
    out = {}
    for scope, counters in after.items():
        prior = before.get(scope, {})
        out[scope] = {k: v - prior.get(k, 0) for k, v in counters.items()}
    return out


def run_case(case: dict[str, Any], plan: Plan, rank: int, delay: dict[str, float]) -> dict[str, Any]:
    """One repetition of one case on this rank: warm-up period, then the timed window."""
    import localsgd
    from localsgd.comm.process_group import ProcessGroupCommunicator

    model = build_model(plan)
    opt = make_optimizer(case["inner"], model)
    pool = batches(plan, rank)
    comm = ProcessGroupCommunicator(delay=delay)
    warm, window = plan.period, plan.periods * plan.period

    def step(i: int) -> None:
        x, y = pool[i % len(pool)]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # DataParallel's hook syncs (or starts, or lands a fragment) here

    with localsgd.DataParallel(model, opt, case["algorithm"], comm=comm):
        for i in range(warm):
            step(i)
        before = json.loads(json.dumps(comm.stats.by_scope))
        waited = comm.stats.seconds
        start = time.perf_counter()
        for i in range(warm, warm + window):
            step(i)
        wall = time.perf_counter() - start
        waited = comm.stats.seconds - waited
        counters = scope_delta(comm.stats.by_scope, before)
    return {"steps": window, "wall_s": wall, "wait_s": waited, "by_scope": counters}


def calibrate_link(plan: Plan, rate_bits: float | None, burst: int, model_bytes: int) -> dict[str, Any]:
    """α and β of the link between the processes, fitted as ``emulation.calibrate`` fits them
    (its probe's all-reduces, with a pause that refills a shaped link's bucket)."""
    from localsgd.emulation import fit_link, probe_sizes
    from localsgd.emulation.probe import measure

    sizes = probe_sizes(rate_bits)
    if rate_bits is None:
        # Loopback: up to twice the model's bytes (all a sync moves), and at least 8 MiB, so
        # that the times grow with the payload beyond a busy scheduler's hiccups.
        top = max(2 * model_bytes, 8 * 2**20)
        sizes = [s for s in sizes if s < top] + [top]
    pause = 2 * burst * 8 / rate_bits + 1e-3 if rate_bits and burst else 0.0
    data = measure(sizes, plan.calibration_reps, 1, pause)
    fit = fit_link(data["bytes"], data["seconds"], int(data["world_size"]), burst)  # type: ignore[arg-type]
    return fit.as_dict() | {"alpha": fit.alpha, "bandwidth": fit.bandwidth}


def worker_body(job: dict[str, Any]) -> dict[str, Any] | None:
    """Calibrate, then run every case interleaved; rank 0 returns every rank's figures."""
    import torch.distributed as dist

    import localsgd

    torch.set_num_threads(1)
    info = localsgd.init_distributed(backend="gloo", timeout=600)
    try:
        plan = Plan(**{**job["plan"], "codecs": tuple(job["plan"]["codecs"])})
        # A fit whose points scatter (another process took the cores mid-probe) would put
        # every prediction off by as much: probe again, up to CALIBRATION_TRIES times, and
        # keep each attempt's error in the record.
        attempts = []
        for _ in range(CALIBRATION_TRIES):
            calibration = calibrate_link(plan, job["rate_bits"], job["burst"], job["model_bytes"])
            # Every rank decides alike (each fits its own timings): on the worst rank's error.
            worst = torch.tensor([float(calibration["median_relative_error"])], dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            attempts.append(float(worst))
            if attempts[-1] <= CALIBRATION_ERROR:
                break
        calibration["attempts_median_relative_error"] = attempts
        work = codec_costs(plan, job["codecs"])
        records: dict[str, list[dict[str, Any]]] = {name: [] for name in job["cases"]}

        def variant(name: str) -> Any:
            def once() -> float:
                record = run_case(job["cases"][name], plan, info.rank, job["delay"])
                records[name].append(record)
                return float(record["wall_s"])

            return once

        interleaved({name: variant(name) for name in job["cases"]}, reps=plan.repetitions, warmup=plan.warmup)
        # interleaved drops the warm-up repetitions' values; drop their records alike.
        mine = {name: recs[plan.warmup :] for name, recs in records.items()}
        ranks: list[Any] = [None] * info.world_size
        dist.all_gather_object(ranks, {"cases": mine, "codec_costs": work})
    finally:
        localsgd.destroy_distributed()
    if info.rank != 0:
        return None
    costs = {
        codec: [statistics.fmean(rank["codec_costs"][codec][i] for rank in ranks) for i in range(2)]
        for codec in work
    }
    return {"calibration": calibration, "ranks": [rank["cases"] for rank in ranks], "codec_costs": costs}


def torchrun_worker(job_file: str) -> int:
    """Under torchrun on the emulated cluster."""
    job = json.loads(Path(job_file).read_text())
    out = worker_body(job)
    if out is not None:
        Path(job["out"]).write_text(json.dumps(out))
    return 0


def spawned_worker(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """A process of the loopback world (``--link delay``)."""
    from localsgd.run.worker import exit_process

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )  # fmt: skip
    out = worker_body(job)
    if out is not None:
        Path(job["out"]).write_text(json.dumps(out))
    # Skip the interpreter's teardown, which can abort a finished gloo process (SIGABRT).
    exit_process(0)


# -- the controller ------------------------------------------------------------------------------


def run_emulated(job: dict[str, Any], plan: Plan, rate: str, work: Path, timeout: float) -> dict[str, Any]:
    from localsgd.emulation import EmulatedCluster

    job_file = work / "job.json"
    with EmulatedCluster(plan.workers, 1, rate) as cluster:
        job["burst"] = cluster.spec.bucket()
        job_file.write_text(json.dumps(job))
        description = cluster.describe()
        codes = cluster.run(
            [str(Path(__file__).resolve()), "--worker", str(job_file)], log_dir=work / "logs", timeout=timeout
        )
    if any(codes) or not Path(job["out"]).exists():
        tail = "\n".join(p.read_text()[-3000:] for p in sorted((work / "logs").glob("*.log")))
        raise RuntimeError(f"the emulated cluster's workers failed ({codes}):\n{tail}")
    return {"description": description}


def evaluate(
    raw: dict[str, Any], job: dict[str, Any], plan: Plan
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Per case and repetition: measured and predicted, from every rank's records."""
    from localsgd.costmodel import Cluster, CodecCost, Link, comm_seconds

    fit = raw["calibration"]
    cluster = Cluster(
        name="calibrated link",
        devices_per_node=1,
        inter=Link(fit["alpha"], fit["bandwidth"]),
        allreduce="ring",
        codecs={codec: CodecCost(*cost) for codec, cost in raw["codec_costs"].items()},
    )
    transfer_only = dataclasses.replace(cluster, codecs={})  # and counters without the codec's keys
    k = plan.workers
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, case in job["cases"].items():
        tau = overlap_of(case)
        reps = []
        for r in range(plan.repetitions):
            per_rank = [rank[name][r] for rank in raw["ranks"]]
            steps = per_rank[0]["steps"]
            step = statistics.fmean(x["wall_s"] for x in per_rank) / steps
            wait = statistics.fmean(x["wait_s"] for x in per_rank) / steps
            compute = step - wait
            counters = per_rank[0]["by_scope"]
            hidden = {"world": tau * compute} if tau else None
            delay = job["delay"] or None
            codec = codec_of(case)
            predicted_wait = comm_seconds(counters, k, cluster, delay, hidden, codec) / steps
            unhidden_wait = comm_seconds(counters, k, cluster, delay, None, codec) / steps
            world = counters.get("world", {})
            syncs = max(world.get("collectives", 0), 1)
            # The codec's part, measured in the run (each rank's own) and predicted; the rest of
            # a compressed average's wait is its all-gather.
            coded_s = statistics.fmean(x["by_scope"].get("world", {}).get("codec_seconds", 0.0) for x in per_rank)
            predicted_codec = cluster.codec_seconds(codec, world) if codec else 0.0
            moved = {scope: {key: v for key, v in c.items() if key not in CODEC_KEYS} for scope, c in counters.items()}
            transfer = comm_seconds(moved, k, transfer_only, delay, hidden)
            reps.append(
                {
                    "step_s": step,
                    "wait_s": wait,
                    "wait_by_rank_s": [x["wait_s"] / steps for x in per_rank],
                    "compute_s": compute,
                    "predicted_wait_s": predicted_wait,
                    "predicted_wait_unhidden_s": unhidden_wait,
                    "predicted_step_s": compute + predicted_wait,
                    "collectives": world.get("collectives", 0),
                    "bytes_per_collective": world.get("bytes", 0) / syncs,
                    "gathers": world.get("gathers", 0),
                    "codec_s_per_sync": coded_s / syncs,
                    "predicted_codec_s_per_sync": predicted_codec / syncs,
                    "gather_s_per_sync": (wait * steps - coded_s) / syncs,
                    "predicted_transfer_s_per_sync": transfer / syncs,
                }
            )
        rows[name] = reps
    ratios: list[dict[str, Any]] = []
    for name, reps in rows.items():
        measured = [x["step_s"] for x in reps]
        predicted = [x["predicted_step_s"] for x in reps]
        streamed_or_coded = name != plain_of(name)
        labels = {"case": name}
        if streamed_or_coded:
            ratios.append(ratio("measured / predicted s/step", measured, predicted, target=BAND[0], **labels))
            ratios.append(
                ratio(
                    "measured / predicted s/step", measured, predicted, target=BAND[1], at_most=True, **labels
                )
            )
        else:
            ratios.append(ratio("measured / predicted s/step", measured, predicted, **labels))
        if codec_of(job["cases"][name]):
            ratios.append(
                ratio(
                    "codec work in the run / calibrated",
                    [x["codec_s_per_sync"] for x in reps],
                    [x["predicted_codec_s_per_sync"] for x in reps],
                    **labels,
                )
            )
            ratios.append(
                ratio(
                    "all-gather wait / predicted transfer",
                    [x["gather_s_per_sync"] for x in reps],
                    [x["predicted_transfer_s_per_sync"] for x in reps],
                    **labels,
                )
            )
        if overlap_of(job["cases"][name]):
            plain = rows[plain_of(name)]
            ratios.append(
                ratio(
                    "hidden share of the network wait",
                    [p["wait_s"] - x["wait_s"] for p, x in zip(plain, reps)],
                    [p["wait_s"] for p in plain],
                    target=HIDDEN_TARGET,
                    **labels,
                )
            )
    return ratios, rows


def span(values: list[float], digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def tables(
    rows: dict[str, list[dict[str, Any]]],
    ratios: list[dict[str, Any]],
    job: dict[str, Any],
    link_note: str,
) -> list[dict[str, Any]]:
    def find(name: str, case: str) -> dict[str, Any] | None:
        return next((r for r in ratios if r["name"] == name and r["case"] == case), None)

    out = []
    for name, reps in rows.items():
        med = statistics.median
        step = find("measured / predicted s/step", name)
        assert step is not None
        hidden = find("hidden share of the network wait", name)
        plain = rows[plain_of(name)]
        codec = codec_of(job["cases"][name])
        predicted_hidden = ""
        wall_hidden = ""
        if hidden is not None:
            predicted_hidden = f"{1 - med(x['predicted_wait_s'] for x in reps) / med(p['predicted_wait_s'] for p in plain):.2f}"
            wall_hidden = span([(p["step_s"] - x["step_s"]) / p["wait_s"] for p, x in zip(plain, reps)], 2)
        out.append(
            [
                name,
                f"{1e3 * med(x['step_s'] for x in reps):.1f}",
                f"{1e3 * med(x['compute_s'] for x in reps):.1f}",
                f"{1e3 * med(x['wait_s'] for x in reps):.2f}",
                f"{1e3 * med(x['predicted_wait_s'] for x in reps):.2f}",
                f"{1e3 * med(x['predicted_step_s'] for x in reps):.1f}",
                f"{step['median']:.3f} [{step['min']:.3f}, {step['max']:.3f}]",
                ""
                if hidden is None
                else f"{hidden['median']:.2f} [{hidden['min']:.2f}, {hidden['max']:.2f}]",
                predicted_hidden,
                wall_hidden,
                f"{med(x['bytes_per_collective'] for x in reps) / 1e6:.3f}",
                ""
                if codec is None
                else f"{1e3 * med(x['codec_s_per_sync'] for x in reps):.1f} / "
                f"{1e3 * med(x['predicted_codec_s_per_sync'] for x in reps):.1f}",
                ""
                if codec is None
                else f"{1e3 * med(x['gather_s_per_sync'] for x in reps):.1f} / "
                f"{1e3 * med(x['predicted_transfer_s_per_sync'] for x in reps):.1f}",
            ]
        )
    reps = len(next(iter(rows.values())))
    return [
        {
            "title": "Step time and network wait, measured against the cost model's prediction",
            "columns": [
                "case",
                "ms/step",
                "compute ms/step",
                "wait ms/step",
                "predicted wait ms/step",
                "predicted ms/step",
                "measured / predicted",
                "hidden share",
                "predicted hidden share",
                "hidden share (wall)",
                "MB per collective",
                "codec ms/sync: run / calibrated",
                "all-gather ms/sync: run / predicted",
            ],
            "rows": out,
            "note": (
                f"Medians over {reps} interleaved repetitions; ratios median [min, max]. {link_note} "
                "wait: the seconds the steps waited in the communicator (a blocking average's "
                "whole collective; an overlapped one's wait when it lands), mean over ranks; "
                "compute = step − wait. Predicted: measured compute + the cost model's wait for "
                "the window's counters on the calibrated link (overlapped averages hiding τ steps "
                "of compute each). hidden share: 1 − wait / the plain case's wait in the same "
                "repetition (target ≥ 0.70); hidden share (wall): (plain step − step) / plain "
                "wait, which also charges the overlap's own costs (snapshot copies, the "
                "collective's thread competing for the cores). Codecs send an all-gather of their "
                "payload (MB per collective: what one rank sends), and encode, decode and average "
                "on every rank: the cost model prices that work with per-value costs calibrated in "
                "the same launch (`comm.codecs.measure_codec`, every rank at once, no transfer, as "
                "`localsgd cluster calibrate` does) from the run's counters of values encoded and "
                "decoded; codec ms/sync: that work as the run timed it (mean over ranks) / as "
                "calibrated; all-gather ms/sync: the rest of the wait / the cost model's transfer. "
                "A shared machine: figures are noisy (load average in the machine field)."
            ),
        }
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, few steps, injected delay"
    )
    parser.add_argument(
        "--link", choices=["auto", "emulated", "delay"], default=None,
        help="emulated (root) or injected delay; auto (default): emulated where possible (--quick: delay)",
    )  # fmt: skip
    parser.add_argument("--repetitions", type=int, default=None, help=f"default {MIN_REPS}")
    parser.add_argument("--share", type=float, default=None, help="a sync's transfer over a period's compute")
    parser.add_argument("--no-codecs", action="store_true", help="leave out the codec cases")
    parser.add_argument(
        "--only", action="append", help="run only the cases whose name contains this (and the plain ones; repeatable)"
    )
    parser.add_argument("--out", help="also write the JSON here (--quick writes nothing otherwise)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return torchrun_worker(args.worker)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    plan = QUICK if args.quick else Plan()
    if args.repetitions is not None:
        if args.repetitions < MIN_REPS and not args.quick:
            parser.error(f"--repetitions must be at least {MIN_REPS} (fewer only with --quick)")
        plan = dataclasses.replace(plan, repetitions=args.repetitions)
    if args.share is not None:
        if not args.share > 0:
            parser.error(f"--share must be > 0, got {args.share}")
        plan = dataclasses.replace(plan, share=args.share)
    from localsgd.emulation import unavailable

    link = args.link or ("delay" if args.quick else "auto")
    if link == "auto":
        link = "emulated" if unavailable() is None else "delay"
    if link == "emulated" and (why := unavailable()) is not None:
        print(f"error: {why} (use --link delay)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    codecs = has_compression() and not args.no_codecs
    model_bytes = 4 * sum(p.numel() for p in build_model(plan).parameters())
    alone = compute_alone(plan)
    transfer = plan.share * plan.period * alone
    delay: dict[str, float] = {}
    rate: str | None = None
    rate_bits: float | None = None
    if link == "emulated":
        # Whole Mbit/s, so the rate reads as a tc rate; the ring of 2 moves the model's bytes.
        mbit = max(1, round(model_bytes * 8 / transfer / 1e6))
        rate, rate_bits = f"{mbit}mbit", mbit * 1e6
        link_note = (
            f"Link: {plan.workers} emulated nodes × 1 process, tbf {rate} (a full sync's transfer "
            f"≈ {model_bytes * 8 / rate_bits / alone:.1f} steps of one process's compute alone)."
        )
    else:
        delay = {"world": transfer}
        link_note = (
            f"Link: {plan.workers} processes on loopback, injected comm.delay {1e3 * transfer:.1f} ms "
            f"per world collective ({plan.share * plan.period:.1f} steps of one process's compute alone)."
        )
    with tempfile.TemporaryDirectory(prefix="streaming-") as tmp:
        work = Path(tmp)
        job = {
            "plan": dataclasses.asdict(plan),
            "cases": {
                name: case
                for name, case in cases(plan, codecs).items()
                if not args.only or name == plain_of(name) or any(part in name for part in args.only)
            },
            "delay": delay,
            "rate_bits": rate_bits,
            "burst": 0,
            "model_bytes": model_bytes,
            "codecs": [c for c in plan.codecs if not args.only or any(c in part or part in c for part in args.only)]
            if codecs
            else [],
            "out": str(work / "rank0.json"),
        }
        timeout = 900.0
        where: dict[str, Any] = {}
        if link == "emulated":
            assert rate is not None
            where = run_emulated(job, plan, rate, work, timeout)
        else:
            run_ranks(spawned_worker, plan.workers, (job,), Path(job["out"]), timeout)
        raw = json.loads(Path(job["out"]).read_text())
    ratios, rows = evaluate(raw, job, plan)
    for r in ratios:
        print(ratio_line(r), flush=True)
    result_tables = tables(rows, ratios, job, link_note)
    for row in result_tables[0]["rows"]:
        print(" | ".join(str(c) for c in row))
    payload = {
        "command": ["python", "benchmarks/streaming.py", *sys.argv[1:]],
        "quick": args.quick,
        "plan": dataclasses.asdict(plan),
        "link": {
            "kind": link,
            "rate": rate,
            "delay": delay,
            "burst_bytes": job["burst"],
            "calibration": raw["calibration"],
            **where,
        },
        "model": {"parameters": model_bytes // 4, "bytes": model_bytes},
        "compute_alone_step_s": alone,
        "codec_costs_s_per_value": raw["codec_costs"],
        "cases": job["cases"],
        "measurements": rows,
        "machine": machine_at_end(),
        "seconds": time.perf_counter() - started,
        "ratios": ratios,
        "tables": result_tables,
    }
    write_results("streaming", payload, args.quick)
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
