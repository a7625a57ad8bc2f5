"""Executing one run: the checks before any record exists (:func:`preflight`), the store it
records into (:func:`open_run_store`), and the run itself on its engine (:func:`execute_run`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from localsgd import engines, trackers, workloads
from localsgd.records.record import ErrorInfo, RecordError
from localsgd.records.store import LOCK, Store
from localsgd.run.bookkeeping import stop_rule
from localsgd.run.config import RunConfig
from localsgd.util.checks import ConfigError, check_output_folder
from localsgd.util.files import DiskFull, disk_full, no_space, remove_temporaries


def preflight(runs: Iterable[RunConfig], *, local: bool = True) -> dict[str, workloads.Workload]:
    """Check what can be checked before any run record exists: every distinct workload is
    built once (its data paths read, an import-path factory called and its result checked),
    every run's batch fits its workload's shards, its trackers' libraries are installed, and, for runs on this machine
    (``local``), that ``device = "cuda"`` finds a CUDA device per worker process. Returns
    the built workloads by spec; ``ConfigError`` naming the key otherwise."""
    built: dict[str, workloads.Workload] = {}
    for run in runs:
        trackers.check_available(run.train.log_to)
        if local and run.device == "cuda":
            _check_cuda(run)
        key = json.dumps(run.workload, sort_keys=True)
        if key not in built:
            try:
                built[key] = workloads.build(run.workload)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"workload = {run.workload_name!r}: building it failed: {type(exc).__name__}: {exc}"
                ) from None
        stop_rule(built[key], run)
        try:
            built[key].steps_per_epoch(run.workers, run.data.batch_size)
        except ValueError as exc:
            raise ConfigError(
                f"data.batch_size = {run.data.batch_size} with workers = {run.workers}: {exc}"
            ) from None
    return built


def _check_cuda(run: RunConfig) -> None:
    import torch

    need = run.processes()
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < need:
        raise ConfigError(
            f"device = 'cuda' with workers = {run.workers} needs {need} CUDA device(s) on this "
            f"machine (one per worker process), and it has {have}; use device = 'auto' or 'cpu'"
        )


def open_run_store(out: str | Path, config: RunConfig) -> Store:
    """The store a single run records into, checked: not another study's (unless that
    study plans this very run), every file readable; ``ConfigError`` naming the file."""
    check_output_folder("--out", out)
    check_store_folder(Path(out))
    try:
        store = Store(out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        owner = store.owner()
        plan = store.plan() if owner else {}
    except RecordError as exc:
        raise ConfigError(
            f"{exc}; delete it (its study writes it again) or record the run in another store"
        ) from None
    runs = plan.get("runs")
    planned = {r.get("run_id") for r in runs if isinstance(r, dict)} if isinstance(runs, list) else set()
    if owner and config.run_id() not in planned:
        raise ConfigError(
            f"store {store.root} belongs to study {owner!r}, which does not plan this run; "
            "record it in another store (--out), or add it to the study's grid"
        )
    return store


STORE_ENTRIES = {"runs", "index.sqlite", "plan.json", "study.toml", "report", "slurm", trackers.FOLDER, LOCK, f"{LOCK}.d"}
"""What a store folder may hold (an existing folder holding anything else is no store)."""


def check_store_folder(out: Path) -> bool:
    """Refuse an existing folder that is neither a store nor empty (``--out`` pointing at
    a project's folder, say); returns whether the folder holds anything."""
    if not out.is_dir():
        return False
    entries = {p.name for p in out.iterdir()}
    if not (out / "index.sqlite").is_file():
        foreign = sorted(entries - STORE_ENTRIES)
        if foreign:
            raise ConfigError(
                f"--out {str(out)!r} is a folder that is not a localsgd store (it holds {foreign[0]!r}); "
                "give a new or empty folder, or a store"
            )
    return bool(entries)


def execute_run(
    config: RunConfig,
    store: Store,
    *,
    timeout: float | None = None,
    workload: workloads.Workload | None = None,
    session: engines.Session | None = None,
    resume: bool = False,
    launch: Callable[[engines.Job], None] | None = None,
) -> str:
    """Run ``config`` to the end through its engine -- on processes of its own, or on
    ``session``'s -- and record it in ``store``; returns the final status. A failed run's
    status holds its root error (the first worker's own exception). A run cancelled from
    outside is left unfinished (the next attempt redoes it, from its last checkpoint when
    it has one and ``resume``), and so is a run whose disk filled up, here or in a worker:
    :class:`~localsgd.util.files.DiskFull` naming the file is raised. ``launch`` places a
    run of several worker processes somewhere else than the engine would (an emulated
    multi-node cluster, say); a run of one process stays here."""
    from localsgd.run.training import train

    engine = engines.get(config.engine)
    run_id = config.run_id()
    folder = store.begin(run_id, config.name, config.to_dict(), resume=resume)

    def train_here(rank: int, world_size: int) -> None:
        train(config, folder, rank, world_size, workload=workload)

    job = engines.Job(
        config.workers,
        config.threads,
        folder,
        train_here,
        timeout,
        device=config.device,
        engine_options=config.engine_options,
        comm_timeout=config.train.timeout_seconds,
        max_restarts=config.train.max_restarts,
        # A parameter server (rank 0) goes on without a lost worker, where the engine's
        # processes are its workers.
        tolerates_lost_workers=config.algorithm_config(steps_per_epoch=1).capabilities.asynchronous
        and engines.Capability.LOST_WORKERS in engine.capabilities,
    )
    error: ErrorInfo | None = None
    try:
        try:
            if launch is not None and config.processes() > 1:
                launch(job)
            elif session is None:
                engine.execute(job)
            else:
                session.execute(job)
        finally:
            # The attempt is over: a worker torn down mid-write left its temporary file.
            remove_temporaries(folder)
    except engines.WorkerFailure as exc:
        error = exc.error
    except DiskFull:
        raise
    except Exception as exc:  # a run trained in this process: recorded as failed, the study goes on
        if no_space(exc):
            raise disk_full(exc, getattr(exc, "filename", None) or folder) from None
        error = ErrorInfo.from_exception(exc)
    if error is not None and error.type == DiskFull.__name__:
        # A worker's disk filled up: not the run's failure. It stays unfinished (its
        # checkpoints kept), and the command stops, to be rerun once there is space.
        raise DiskFull.from_message(error.message)
    return store.finish(run_id, error=error)


