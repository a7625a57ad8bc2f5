"""What the benchmarks record about the machine they ran on, and where their results go."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from localsgd.studies.executors.local import usable_cores

RESULTS = Path(__file__).resolve().parent / "results"


def machine_at_end() -> dict[str, Any]:
    """Date, versions, usable cores and the load average now (the machine is shared); the
    line saying so is printed."""
    load = os.getloadavg()
    print(f"\n{usable_cores()} cores; load average {load[0]:.1f} at the end (the machine is shared)")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cores": usable_cores(),
        "load_average_at_end": load,
    }


def write_results(name: str, out: dict[str, Any], quick: bool) -> None:
    """``benchmarks/results/<name>.json``, unless the run was ``--quick`` (a smoke test)."""
    if quick:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"written: {RESULTS.name}/{name}.json")


# -- repetitions and ratios ---------------------------------------------------------------------
#
# Every benchmark measures its variants interleaved (each repetition runs every variant once,
# in an order that rotates, so drift and a neighbour's load fall on all of them alike) and
# repeats >= 5 times. A ratio is taken per repetition (numerator and denominator from the same
# repetition) and reported as its median and range; the range says whether a target is met
# reliably, met in the median only, or straddled.

MIN_REPS = 5


def interleaved(
    variants: dict[str, Callable[[], float]], reps: int = MIN_REPS, *, warmup: int = 0
) -> dict[str, list[float]]:
    """``{variant: [value per repetition]}``: each callable returns one measurement (seconds,
    or a rate); repetition r runs the variants rotated by r. ``warmup`` repetitions run first
    and are dropped. A callable may instead return ``{variant: value}`` for several variants
    it measured together (alternating call by call, say); each lands under its own name."""
    names = list(variants)
    out: dict[str, list[float]] = {}
    for r in range(warmup + reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            value = variants[name]()
            if r < warmup:
                continue
            values = value if isinstance(value, dict) else {name: value}
            for key, v in values.items():
                out.setdefault(key, []).append(float(v))
    return out


def ratio(
    name: str,
    numerator: list[float],
    denominator: list[float],
    *,
    target: float | None = None,
    at_most: bool = False,
    **labels: Any,
) -> dict[str, Any]:
    """The per-repetition ratios ``numerator[i] / denominator[i]``, summarised.

    ``target`` with ``at_most`` False means "ratio >= target" is wanted, True "<= target".
    ``verdict`` is ``meets`` (the whole range on the good side), ``meets in median`` (the
    median is, the range straddles), ``misses in median`` (the range straddles, the median
    does not), ``misses`` (the whole range on the wrong side), or None without a target.
    ``labels`` (workload, K, ...) are kept in the record for the tables.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"{name}: {len(numerator)} numerators against {len(denominator)} denominators")
    values = [n / d for n, d in zip(numerator, denominator)]
    med = statistics.median(values)
    low, high = min(values), max(values)
    verdict = None
    if target is not None:

        def good(v: float) -> bool:
            return v <= target if at_most else v >= target

        if good(low) and good(high):
            verdict = "meets"
        elif not good(low) and not good(high):
            verdict = "misses"
        else:
            verdict = "meets in median" if good(med) else "misses in median"
    return {
        "name": name,
        **labels,
        "median": med,
        "min": low,
        "max": high,
        "reps": len(values),
        "values": values,
        "target": target,
        "target_is": None if target is None else ("<=" if at_most else ">="),
        "verdict": verdict,
    }


def ratio_line(r: dict[str, Any]) -> str:
    """``name  median [min, max]  (target >= 3: meets)`` for a benchmark's printed table."""
    labels = " ".join(f"{k}={v}" for k, v in r.items() if k not in RATIO_FIELDS)
    text = f"{r['name']:<34} {labels:<22} {r['median']:8.3f}  [{r['min']:.3f}, {r['max']:.3f}]  n={r['reps']}"
    if r["target"] is not None:
        text += f"  (target {r['target_is']} {r['target']:g}: {r['verdict']})"
    return text


RATIO_FIELDS = {"name", "median", "min", "max", "reps", "values", "target", "target_is", "verdict"}


def free_port() -> int:
    """A free TCP port on the loopback interface (for a spawned gloo world's rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(target: Callable[..., None], world: int, args: tuple[Any, ...], out: Path, timeout: float) -> None:
    """Spawn ``world`` processes running ``target(rank, world, port, *args)`` and wait for
    them; a rank that hangs past ``timeout`` or fails, or no ``out`` file at the end, fails
    the benchmark (no partial tables)."""
    import multiprocessing as mp
    import time

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
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
        raise TimeoutError(f"world {world}: ranks {hung} still running after {timeout:.0f} s")
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed or not Path(out).exists():
        raise RuntimeError(f"world {world}: ranks {failed} failed (see their tracebacks)")
