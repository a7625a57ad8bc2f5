"""Running runs: one run through its engine into a store, and every run of a study once,
resumable, with progress and an ETA.

A study runs its runs through engine sessions (:class:`~localsgd.engines.Session`), whose
worker pools stay up from one run to the next; ``parallel`` runs go at once, each on
sessions of its own, and never more worker threads than the machine has cores unless the
caller insists. ``executor = "slurm"`` submits each run as a Slurm job instead
(:mod:`localsgd.engines.slurm`), into the same store."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TextIO

from localsgd import engines, workloads
from localsgd.records.record import ErrorInfo
from localsgd.records.store import FINISHED, Store
from localsgd.studies.grid import Study
from localsgd.studies.schema import RunConfig
from localsgd.studies.trials import DEFAULT_BATCH, batches, execute_trials
from localsgd.util.checks import ConfigError

log = logging.getLogger(__name__)


EXECUTORS = ("local", "slurm")


def _trial(study: Study, run_id: str) -> dict[str, Any]:
    """A planned run's search entry (block, trial, searched keys), when it is a trial."""
    trial = study.trials.get(run_id)
    return {} if trial is None else {"search": trial}


def preflight(runs: Iterable[RunConfig], *, local: bool = True) -> dict[str, workloads.Workload]:
    """Check what can be checked before any run record exists: every distinct workload is
    built once (its data paths read, an import-path factory called and its result checked),
    every run's batch fits its workload's shards, and, for runs on this machine
    (``local``), that ``device = "cuda"`` finds a CUDA device per worker process. Returns
    the built workloads by spec; ``ConfigError`` naming the key otherwise."""
    built: dict[str, workloads.Workload] = {}
    for run in runs:
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
        stop = run.train.stop_metric()
        names = [m.name for m in built[key].metrics]
        if stop is not None and stop[0] not in names:
            raise ConfigError(f"train.stop_at = {run.train.stop_at!r}: {run.workload_name} has the metrics {names}")
        try:
            built[key].steps_per_epoch(run.workers, run.data.batch_size)
        except ValueError as exc:
            raise ConfigError(
                f"data.batch_size = {run.data.batch_size} with workers = {run.workers}: {exc}"
            ) from None
    return built


def _check_cuda(run: RunConfig) -> None:
    import torch

    need = engines.get(run.engine).processes(run.workers)
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < need:
        raise ConfigError(
            f"device = 'cuda' with workers = {run.workers} needs {need} CUDA device(s) on this "
            f"machine (one per worker process), and it has {have}; use device = 'auto' or 'cpu'"
        )


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_parallel(
    runs: Sequence[RunConfig], parallel: int, *, cores: int | None = None, oversubscribe: bool = False
) -> None:
    """Refuse ``parallel`` runs at once when they could need more threads than ``cores``
    (parallel x worker processes x threads of the widest run), unless ``oversubscribe``:
    runs that share cores time each other, and their wall times mean nothing."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"--parallel must be an integer >= 1, got {parallel!r}")
    if min(parallel, len(runs)) <= 1 or oversubscribe:
        return
    cores = usable_cores() if cores is None else cores

    def width(run: RunConfig) -> int:
        return engines.get(run.engine).processes(run.workers) * run.threads

    widest = max(runs, key=width)
    at_once = min(parallel, len(runs))  # slots beyond the runs stay idle
    need = at_once * width(widest)
    if need > cores:
        fits = cores // width(widest)
        hint = f"use --parallel {fits} or less" if fits >= 2 else "run them one at a time"
        raise ConfigError(
            f"--parallel {parallel} runs up to {at_once} x {engines.get(widest.engine).processes(widest.workers)} "
            f"worker process(es) x {widest.threads} thread(s) = {need} threads at once (the widest "
            f"run: workers = {widest.workers}, threads = {widest.threads}), and this machine has "
            f"{cores} cores; {hint}, or pass --oversubscribe to share the cores anyway"
        )


def execute_run(
    config: RunConfig,
    store: Store,
    *,
    timeout: float | None = None,
    workload: workloads.Workload | None = None,
    session: engines.Session | None = None,
    launch: Callable[[engines.Job], None] | None = None,
) -> str:
    """Run ``config`` to the end through its engine -- on processes of its own, or on
    ``session``'s -- and record it in ``store``; returns the final status. A failed run's
    status holds its root error (the first worker's own exception). A run cancelled from
    outside is left unfinished (the next attempt redoes it). ``launch`` places a run of
    several worker processes somewhere else than the engine would (an emulated multi-node
    cluster, say); a run of one process stays here."""
    from localsgd.studies.trainer import train

    engine = engines.get(config.engine)
    run_id = config.run_id()
    folder = store.begin(run_id, config.name, config.to_dict())

    def train_here(rank: int, world_size: int) -> None:
        train(config, folder, rank, world_size, workload=workload)

    job = engines.Job(config.workers, config.threads, folder, train_here, timeout, device=config.device)
    error: ErrorInfo | None = None
    try:
        if launch is not None and engine.processes(config.workers) > 1:
            launch(job)
        elif session is None:
            engine.execute(job)
        else:
            session.execute(job)
    except engines.WorkerFailure as exc:
        error = exc.error
    except Exception as exc:  # a run trained in this process: recorded as failed, the study goes on
        error = ErrorInfo.from_exception(exc)
    return store.finish(run_id, error=error)


class _Sessions:
    """One slot's sessions, one per engine, opened on first use."""

    def __init__(self, open_session: Callable[[engines.Engine], engines.Session]) -> None:
        self._open = open_session
        self._sessions: dict[str, engines.Session] = {}
        self._lock = threading.Lock()

    def get(self, engine: str) -> engines.Session:
        with self._lock:
            if engine not in self._sessions:
                self._sessions[engine] = self._open(engines.get(engine))
            return self._sessions[engine]

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()


def run_study(
    study: Study,
    out: Path,
    *,
    study_file: Path | None = None,
    retry_failed: bool = False,
    execute: Callable[[Any, Store], str] | None = None,
    progress: bool = True,
    output: TextIO | None = None,
    parallel: int | None = None,
    oversubscribe: bool = False,
    executor: str = "local",
    executor_options: Mapping[str, Any] | None = None,
    launch: Callable[[engines.Job], None] | None = None,
    batch_trials: int = DEFAULT_BATCH,
) -> Counter[str]:
    """Run every run of ``study`` not already finished in the store at ``out``.

    Completed (and, unless ``retry_failed``, failed and diverged) runs are skipped; a run
    left unfinished by an interrupted study starts again from scratch. ``parallel`` runs
    go at once (default: 1 on this machine, every run under Slurm), refused when they
    would oversubscribe this machine's cores (:func:`check_parallel`). ``executor``: ``local`` (worker
    pools on this machine) or ``slurm`` (a Slurm job per run through submitit;
    ``executor_options`` as for :class:`~localsgd.engines.slurm.SlurmSession`). Progress
    goes to ``output`` (default stdout): a line per finished run, or a bar in a terminal.
    ``launch``: as for :func:`execute_run`. ``batch_trials``: at most that many runs that
    differ only in optimizer metaparameters, schedule and seed train together in this
    process on an engine that can (:mod:`localsgd.studies.trials`), one run at a time
    (``parallel`` 1, this machine); 1 runs each alone. Returns how many runs ended in
    each status, skipped ones included.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}")
    if isinstance(batch_trials, bool) or not isinstance(batch_trials, int) or batch_trials < 1:
        raise ConfigError(f"--batch-trials must be an integer >= 1, got {batch_trials!r}")
    # submitit's local executor (cluster = "local") runs the jobs on this machine's cores.
    here = executor == "local" or (executor_options or {}).get("cluster") == "local"
    built = preflight(study.runs, local=here)
    # Nothing is written until every check has passed: a new store is created after them.
    existing = Store(out, create=False) if (out / "index.sqlite").exists() else None
    counts: Counter[str] = Counter()
    todo = []
    for run in study.runs:
        status = existing.status(run.run_id()) if existing is not None else None
        keep = status == "completed" or (status in FINISHED and not retry_failed)
        if keep:
            counts[f"skipped ({status})"] += 1
        else:
            todo.append(run)
    if parallel is None:
        parallel = 1 if here else max(1, len(todo))
    check_parallel(todo, parallel, oversubscribe=oversubscribe or not here)
    if executor == "slurm":
        from localsgd.engines.slurm import SlurmSession

        options = dict(executor_options or {})
        SlurmSession.check_options(options, todo)
        shared = _Sessions(lambda engine: SlurmSession(engine, store.root / "slurm", options))

        def slot_sessions() -> _Sessions:
            return shared
    else:

        def slot_sessions() -> _Sessions:
            # A run of one process may train in this process only when it is alone: runs
            # in threads would share its global state (RNG, thread count).
            return _Sessions(lambda engine: engine.session(in_process=parallel == 1))

    store = existing or Store(out)
    if study_file is not None and not (
        (out / "study.toml").exists() and os.path.samefile(study_file, out / "study.toml")
    ):
        shutil.copyfile(study_file, out / "study.toml")
    store.write_plan(
        {
            "study": study.section.name,
            "description": study.section.description,
            "target": dict(study.section.target),
            "runs": [
                {"run_id": r.run_id(), **r.to_dict(), **_trial(study, r.run_id())} for r in study.runs
            ],
        },
    )
    if not todo:
        return counts
    from localsgd.studies.progress import StudyProgress

    reporter = StudyProgress(study.section.name, len(todo), parallel=parallel, output=output)
    skipped = sum(counts.values())
    lock = threading.Lock()
    # Trials share this process's global state (RNG, threads): batched only when alone here.
    batched = execute is None and executor == "local" and parallel == 1
    queue = iter(batches(todo, batch_trials) if batched else [[run] for run in todo])
    stop = threading.Event()

    def one_batch(runs: list[RunConfig], sessions: _Sessions) -> None:
        if len(runs) == 1:
            one(runs[0], sessions)
            return
        if progress:
            for run in runs:
                reporter.started(run)
        started = time.monotonic()
        workload = built[json.dumps(runs[0].workload, sort_keys=True)]
        statuses = execute_trials(runs, store, workload=workload)
        seconds = (time.monotonic() - started) / len(runs)  # what each trial cost
        for run, status in zip(runs, statuses):
            _finished(run, status, seconds, workload)

    def one(run: RunConfig, sessions: _Sessions) -> None:
        if progress:
            reporter.started(run)
        started = time.monotonic()
        workload = built[json.dumps(run.workload, sort_keys=True)]
        if execute is not None:
            status = execute(run, store)
        else:
            status = execute_run(
                run, store, workload=workload, session=sessions.get(run.engine), launch=launch
            )
        _finished(run, status, time.monotonic() - started, workload)

    def _finished(run: RunConfig, status: str, seconds: float, workload: workloads.Workload) -> None:
        with lock:
            counts[status] += 1
        if progress:
            info = store.final_status(run.run_id())
            reporter.finished(run, status, info, seconds, workloads.metric(workload))
        elif status != "completed":
            error = store.error(run.run_id())
            log.warning("run %s (%s) %s: %s", run.run_id(), run.name, status, error.line() if error else "")

    def slot(sessions: _Sessions) -> None:
        while not stop.is_set():
            with lock:
                runs = next(queue, None)
            if runs is None:
                return
            one_batch(runs, sessions)

    all_sessions = [slot_sessions() for _ in range(parallel)]
    with reporter if progress else contextlib.nullcontext():
        if progress:
            where = "on this machine" if executor == "local" else "as Slurm jobs"
            if executor == "slurm" and here:
                where += " (submitit's local executor)"
            reporter.say(
                f"study {study.section.name}: {len(todo)} run(s) to do ({skipped} finished before), "
                f"{parallel} at a time {where}; store {out}"
            )
        try:
            if parallel == 1:
                slot(all_sessions[0])
            else:
                with ThreadPoolExecutor(parallel, thread_name_prefix="study-slot") as pool:
                    futures = [pool.submit(slot, sessions) for sessions in all_sessions]
                    try:
                        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                        for future in done:
                            future.result()
                    except BaseException:
                        # Stop the other slots: no new runs, and the runs in progress are
                        # cancelled (left unfinished, redone by the next attempt).
                        stop.set()
                        for sessions in all_sessions:
                            sessions.close()
                        raise
        finally:
            stop.set()
            for sessions in all_sessions:
                sessions.close()
    return counts
