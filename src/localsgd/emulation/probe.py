"""The link probe's worker: timed all-reduces of a few sizes on the real process group.

``python -m localsgd.emulation.probe OUT --sizes 4096,65536,... [--reps 7] [--warmup 2]
[--pause S]`` under torchrun. Every rank averages a flat float32 buffer of each size through
:class:`~localsgd.comm.process_group.ProcessGroupCommunicator` (what a run's sync does,
the 1/K scaling included), after a barrier each time so that no rank's lateness is counted
as transfer time; rank 0 writes the median seconds per size to ``OUT`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def measure(sizes: list[int], reps: int, warmup: int, pause: float = 0.0) -> dict[str, object]:
    import torch.distributed as dist

    from localsgd.comm.process_group import ProcessGroupCommunicator

    comm = ProcessGroupCommunicator()
    medians = []
    for nbytes in sizes:
        buffer = torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
        times = []
        for i in range(warmup + reps):
            if pause:
                time.sleep(pause)
            dist.barrier()
            start = time.perf_counter()
            comm.average([buffer])
            if i >= warmup:
                times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return {"world_size": comm.world_size, "bytes": [max(n // 4, 1) * 4 for n in sizes], "seconds": medians}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localsgd.emulation.probe", description=__doc__)
    parser.add_argument("out", help="JSON file rank 0 writes")
    parser.add_argument("--sizes", required=True, help="payload bytes per all-reduce, comma-separated")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to idle before each all-reduce")
    args = parser.parse_args(argv)
    import localsgd

    torch.set_num_threads(1)
    info = localsgd.init_distributed(backend="gloo")
    try:
        result = measure([int(s) for s in args.sizes.split(",")], args.reps, args.warmup, args.pause)
        if info.rank == 0:
            Path(args.out).write_text(json.dumps(result))
    finally:
        localsgd.destroy_distributed()
    return 0


def forked_entry(*argv: str) -> None:
    """:func:`main` for a launcher that forks its workers from a process that has imported
    this module (:mod:`localsgd.engines.launching.elastic`): a failure ends the process with
    its exit code; a success returns, for torch's agent to collect."""
    code = main(list(argv))
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
