"""The worker entry point every launch path shares.

``python -m localsgd.worker CONFIG [--out STORE | --run-dir DIR] [--set key=value ...]``
under ``torchrun`` (one machine or ``--nnodes N``), started by ``localsgd train`` through
torch's elastic launcher, or by a Slurm job. ``python -m localsgd.worker --serve ADDRESS``
is a pool worker (see :mod:`localsgd.engines.launching.pool`): it joins the process group once and
trains the runs its controller hands it, one after another. Rank 0 writes the run record;
a rank that fails records its own exception in ``DIR/errors/`` for the launcher's caller.

Under torch's elastic launcher a worker dies with its launcher (a parent-death signal),
beats (:mod:`localsgd.engines.launching.heartbeat`) when its launcher watches, and joins the process
group with the run's ``train.timeout_seconds``. A restarted worker (``--max-restarts``)
resumes the run from its last checkpoint. Multi-node runs bind where the user says: the
rendezvous to ``--rdzv-endpoint`` (and ``python -m localsgd.engines.launching.elastic --bind ADDR``
keeps the stores there), gloo to ``GLOO_SOCKET_IFNAME`` (see docs/reliability.md).

Exit codes: 0 the run completed or diverged (a diverged run is a result, not a crash to
restart), 1 it failed, 2 a bad config or store, 3 the controller or launcher went away,
4 a file could not be written for want of space (the run is left unfinished).
A worker ends through :func:`exit_process`: once its record, logs and process group are
closed, it leaves without the interpreter's teardown (see there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import NoReturn

import localsgd
from localsgd import workloads
from localsgd.distributed import resolve_device
from localsgd.engines.launching.heartbeat import start_beating
from localsgd.engines.launching.launch import write_worker_error
from localsgd.engines.launching.pool import PoolConnection, output_to
from localsgd.records.store import CHECKPOINTS, DEFAULT_RUN_STORE, Store
from localsgd.run.config import RunConfig
from localsgd.run.execute import open_run_store, preflight
from localsgd.run.loading import load_run_config
from localsgd.run.training import train
from localsgd.util.checks import ConfigError
from localsgd.util.files import EXIT_DISK_FULL, DiskFull
from localsgd.util.lifetime import (
    DEFAULT_TIMEOUT_SECONDS,
    EXIT_ORPHANED,
    WATCH_FD,
    die_with_parent,
    exit_process,
    exit_status,
    flush_output,
    name_process,
    restart_attempt,
    watch_parent,
)

log = logging.getLogger("localsgd.worker")

CACHED_WORKLOADS = 2
"""Built workloads (their data in memory) a pool worker keeps for the next runs."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localsgd.worker", description=__doc__)
    parser.add_argument("config", nargs="?", help="run config, .toml or .json")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out", default=DEFAULT_RUN_STORE, help=f"store to record the run in (default: {DEFAULT_RUN_STORE})"
    )
    where.add_argument("--run-dir", help="write the record into this folder (set by the launcher)")
    where.add_argument("--serve", metavar="HOST:PORT", help="be a pool worker of this controller")
    parser.add_argument("--device", default="auto", help="with --serve: the runs' device setting")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="with --serve: the process group's timeout in seconds (the runs' train.timeout_seconds)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()  # torch's elastic agent starts its workers from its main thread
    watched = os.environ.get(WATCH_FD, "")
    if watched.isdigit():
        # Started by a launch that may run in any thread of its process: a pipe, not a signal.
        watch_parent(int(watched), lambda: os._exit(EXIT_ORPHANED))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rank = int(os.environ.get("RANK", "0") or 0)
    start_beating(rank)
    if args.serve is not None:
        return serve(args.serve, args.device, args.timeout)
    if args.config is None:
        parser.error("a run config is required (or --serve)")
    joined = False
    try:
        config = load_run_config(args.config, args.overrides)
        # NCCL only when this run trains on CUDA; a CPU run uses gloo even on a GPU machine.
        device = resolve_device(config.device)
        info = localsgd.init_distributed(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=config.train.timeout_seconds
        )
        joined = True
        rank = info.rank
        return run(config, info, args.run_dir, args.out)
    except BaseException as exc:
        # Recorded before the process group closes: its peers fail when it does, and the
        # first error recorded is the run's.
        if args.run_dir is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            # On another node the folder may not exist: that node's launcher reports the error.
            with contextlib.suppress(OSError, DiskFull):
                write_worker_error(args.run_dir, rank, exc)
        if isinstance(exc, ConfigError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, DiskFull):
            print(f"error: {exc}: free space and rerun the same command", file=sys.stderr)
            return EXIT_DISK_FULL
        raise
    finally:
        if joined:
            localsgd.destroy_distributed()


def run(config: RunConfig, info: localsgd.DistInfo, run_dir: str | None, out: str) -> int:
    # Built on every rank before anything is recorded: a bad workload fails here, as a
    # configuration error, rather than inside a half-written run.
    # This node checks its own devices when it resolves the device (one of several nodes
    # cannot tell how many processes the others run).
    workload = next(iter(preflight([config], local=False).values()))
    asynchronous = config.algorithm_config(steps_per_epoch=1).capabilities.asynchronous
    if info.rank == 0 and info.world_size > 1 and asynchronous and under_torchrun():
        # torch's elastic agent stops the group when a worker dies: say so at the start, and
        # record which worker was lost when the agent stops rank 0 (SIGTERM).
        print(TORCHRUN_NOTE, file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _stopped_after_loss)
    with contextlib.ExitStack() as held:
        store = None
        if run_dir is not None:
            folder = Path(run_dir)
        else:
            store, folder = _open_run(config, info, out, held)
        try:
            status = train(
                config,
                folder if info.rank == 0 else None,
                info.rank,
                info.world_size,
                info.backend,
                workload=workload,
                # On another node the folder may be out of reach: no checkpoints there.
                checkpoints=folder / CHECKPOINTS if folder.is_dir() else None,
            )
        except DiskFull:
            store = None  # not the run's failure: left unfinished, to be rerun once there is space
            raise
        finally:
            if store is not None:
                final = store.finish(config.run_id())
                log.info("run %s %s: %s", config.run_id(), final, store.run_dir(config.run_id()))
    return 0 if status.status in ("completed", "diverged") else 1


TORCHRUN_NOTE = (
    "note: under torchrun a worker lost on rank 0's node ends this asynchronous run (torch's "
    "elastic agent stops every worker of its node when one dies); `localsgd train` goes on without it"
)


def under_torchrun() -> bool:
    """Whether torch's elastic agent started this worker (by hand, or a launcher built on it)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


LOSS_GRACE = 2.0
"""Seconds rank 0, stopped by torch's elastic agent, waits for its server to see a loss."""


class StoppedAfterLoss(RuntimeError):
    """torch's elastic agent stopped rank 0 (SIGTERM) after this rank's server lost a worker."""


def _stopped_after_loss(signum: int, frame: object) -> None:
    import time

    from localsgd.comm.parameter_server import LOST

    # The agent may stop this rank before the server's thread has seen the dead worker's
    # connection close: a moment for it (the agent waits far longer before SIGKILL).
    deadline = time.monotonic() + LOSS_GRACE
    while not LOST and time.monotonic() < deadline:
        time.sleep(0.05)
    if LOST:
        lost = ", ".join(
            f"rank {k}" + (f" at version {v}" if v is not None else "") for k, v in sorted(LOST.items())
        )
        raise StoppedAfterLoss(
            f"torch's elastic agent stopped the run after a worker was lost ({lost}): under torchrun "
            "a lost worker ends an asynchronous run; `localsgd train` goes on without it"
        )
    # Stopped with no worker lost (the agent stopping the group for another reason): end as
    # SIGTERM always ended a worker.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _open_run(
    config: RunConfig, info: localsgd.DistInfo, out: str, held: contextlib.ExitStack
) -> tuple[Store | None, Path]:
    """Started by hand under torchrun: rank 0 owns the store (it holds the run's lock for
    the run, in ``held``) and tells the others where the run is, or why it could not open
    it (else they would wait for it until the timeout)."""
    import torch.distributed as dist

    shared: list[str | None] = [None, None]
    store = None
    if info.rank == 0:
        try:
            store = open_run_store(out, config)
            held.enter_context(store.run_lock(config.run_id()))
            # A restart of this launch resumes the run; a new launch starts it afresh.
            folder = store.begin(config.run_id(), config.name, config.to_dict(), resume=restart_attempt() > 0)
            shared = [None, str(folder)]
        except Exception as exc:
            shared = [f"rank 0 could not open the store {out!r}: {exc}", None]
    if info.world_size > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise ConfigError(shared[0]) if info.rank == 0 else RuntimeError(shared[0])
    return store, Path(str(shared[1]))


def serve(address: str, device_name: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> int:
    """A pool worker: join the process group once, then train each run the controller at
    ``address`` hands over until it says stop. A run that raises is recorded (the worker's
    own exception, in the run folder) and ends this process: its peers may be waiting in a
    collective, so the pool is not reused."""
    device = resolve_device(device_name)
    info = localsgd.init_distributed(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    built: OrderedDict[str, workloads.Workload] = OrderedDict()
    try:
        connection = PoolConnection(address, info.rank)
        for run_dir in connection.runs():
            with output_to(run_dir / "workers.log"):
                try:
                    config = load_run_config(run_dir / "config.json")
                    status = train(
                        config,
                        run_dir if info.rank == 0 else None,
                        info.rank,
                        info.world_size,
                        info.backend,
                        workload=_workload(built, config),
                        checkpoints=run_dir / CHECKPOINTS,
                    )
                except BaseException as exc:
                    with contextlib.suppress(OSError):  # the log's disk may be full
                        traceback.print_exc()
                    with contextlib.suppress(OSError, DiskFull):
                        write_worker_error(run_dir, info.rank, exc)
                    raise
            connection.done(status.status)
        connection.close()
    finally:
        localsgd.destroy_distributed()
    return 0


def _workload(built: OrderedDict[str, workloads.Workload], config: RunConfig) -> workloads.Workload:
    """The run's workload, built once per spec: a workload's data and model depend on its
    spec alone, never on a run (shards are a function of seed, epoch and rank)."""
    key = json.dumps(config.workload, sort_keys=True)
    if key in built:
        built.move_to_end(key)
    else:
        built[key] = workloads.build(config.workload)
        while len(built) > CACHED_WORKLOADS:
            built.popitem(last=False)
    return built[key]


def _main_code(argv: list[str] | None) -> int | str | None:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code
    except BaseException:
        traceback.print_exc()
        return 1


def entry(argv: list[str] | None = None) -> NoReturn:
    """``python -m localsgd.worker``: :func:`main`, ended by :func:`exit_process`."""
    exit_process(_main_code(argv))


def forked_entry(*argv: str) -> None:
    """``python -m localsgd.worker ARGV`` as a function, for a launcher that forks its
    workers from its own process, which has imported torch and this module already
    (:mod:`localsgd.engines.launching.elastic`): a worker starts without paying for an
    interpreter and its imports. The launcher is the worker's parent, as it is of a started
    worker, so the parent-death signal armed in :func:`main` ties the worker to it.

    A failure ends the process at once with :func:`main`'s exit code, which torch's agent
    reports; a success returns, for the agent to collect, and multiprocessing then ends the
    process with ``os._exit`` (no interpreter teardown either)."""
    # Its command line is the launcher's: the name says what it is (ps -o comm, top), in the
    # 15 bytes a name keeps, whole up to rank 99999.
    name_process(f"localsgd r{os.environ.get('RANK', '?')}")
    status = exit_status(_main_code(list(argv)))
    if status != 0:
        exit_process(status)
    flush_output()


if __name__ == "__main__":
    entry()
