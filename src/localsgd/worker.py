"""The worker entry point every launch path shares.

``python -m localsgd.worker CONFIG [--out STORE | --run-dir DIR] [--set key=value ...]``
under ``torchrun`` (one machine or ``--nnodes N``), or started by ``localsgd train`` and
``localsgd study`` through torch's elastic launcher. Rank 0 writes the run record; a rank
that fails records its own exception in ``DIR/errors/`` for the launcher's caller.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import localsgd
from localsgd.distributed import resolve_device
from localsgd.engines.processes import write_worker_error
from localsgd.records.store import Store
from localsgd.studies.loading import load_run_config
from localsgd.studies.runner import preflight
from localsgd.studies.schema import RunConfig
from localsgd.studies.trainer import train
from localsgd.util.checks import ConfigError

log = logging.getLogger("localsgd.worker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localsgd.worker", description=__doc__)
    parser.add_argument("config", help="run config, .toml or .json")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default="runs", help="store to record the run in (default: runs)")
    where.add_argument("--run-dir", help="write the record into this folder (set by the launcher)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rank = 0
    try:
        config = load_run_config(args.config, args.overrides)
        # NCCL only when this run trains on CUDA; a CPU run uses gloo even on a GPU machine.
        device = resolve_device(config.device)
        info = localsgd.init_distributed(backend="nccl" if device.type == "cuda" else "gloo")
        rank = info.rank
        try:
            return run(config, info, args.run_dir, args.out)
        finally:
            localsgd.destroy_distributed()
    except BaseException as exc:
        if args.run_dir is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            # On another node the folder may not exist: that node's launcher reports the error.
            with contextlib.suppress(OSError):
                write_worker_error(args.run_dir, rank, exc)
        if isinstance(exc, ConfigError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def run(config: RunConfig, info: localsgd.DistInfo, run_dir: str | None, out: str) -> int:
    import torch.distributed as dist

    store = None
    # Built on every rank before anything is recorded: a bad workload fails here, as a
    # configuration error, rather than inside a half-written run.
    workload = next(iter(preflight([config]).values()))
    if run_dir is not None:
        folder = Path(run_dir) if info.rank == 0 else None
    else:
        # Started by hand under torchrun: rank 0 owns the store, and tells the others whether
        # it could open the run (else they would wait for it until the timeout).
        problem: list[str | None] = [None]
        folder = None
        if info.rank == 0:
            try:
                store = Store(out)
                folder = store.begin(config.run_id(), config.name, config.to_dict())
            except Exception as exc:
                problem = [f"rank 0 could not open the store {out!r}: {exc}"]
        if info.world_size > 1:
            dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise RuntimeError(problem[0])
    try:
        status = train(config, folder, info.rank, info.world_size, info.backend, workload=workload)
    finally:
        if store is not None:
            final = store.finish(config.run_id())
            log.info("run %s %s: %s", config.run_id(), final, store.run_dir(config.run_id()))
    return 0 if status.status in ("completed", "diverged") else 1


if __name__ == "__main__":
    sys.exit(main())
