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
from localsgd.records.lock import FileLock
from localsgd.records.record import ErrorInfo, RecordError
from localsgd.records.store import FINISHED, LOCK, Store
from localsgd.studies.grid import Study
from localsgd.studies.schema import RunConfig
from localsgd.studies.trainer import stop_rule
from localsgd.studies.trials import DEFAULT_BATCH, batches, execute_trials
from localsgd.util.checks import ConfigError, check_output_folder

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
        return run.processes() * run.threads

    widest = max(runs, key=width)
    at_once = min(parallel, len(runs))  # slots beyond the runs stay idle
    need = at_once * width(widest)
    if need > cores:
        fits = cores // width(widest)
        hint = f"use --parallel {fits} or less" if fits >= 2 else "run them one at a time"
        raise ConfigError(
            f"--parallel {parallel} runs up to {at_once} x {widest.processes()} "
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
    resume: bool = False,
    launch: Callable[[engines.Job], None] | None = None,
) -> str:
    """Run ``config`` to the end through its engine -- on processes of its own, or on
    ``session``'s -- and record it in ``store``; returns the final status. A failed run's
    status holds its root error (the first worker's own exception). A run cancelled from
    outside is left unfinished (the next attempt redoes it, from its last checkpoint when
    it has one and ``resume``). ``launch`` places a run of several worker processes
    somewhere else than the engine would (an emulated multi-node cluster, say); a run of
    one process stays here."""
    from localsgd.studies.trainer import train

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
    )
    error: ErrorInfo | None = None
    try:
        if launch is not None and config.processes() > 1:
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
    adopt_store: bool = False,
    launch: Callable[[engines.Job], None] | None = None,
    batch_trials: int = DEFAULT_BATCH,
    plan: Mapping[str, Any] | None = None,
) -> Counter[str]:
    """Run every run of ``study`` not already finished in the store at ``out``.

    Completed (and, unless ``retry_failed``, failed and diverged) runs are skipped; a run
    left unfinished by an interrupted study resumes from its last checkpoint (or starts
    again without one). ``parallel`` runs
    go at once (default: 1 on this machine, every run under Slurm), refused when they
    would oversubscribe this machine's cores (:func:`check_parallel`). ``executor``: ``local`` (worker
    pools on this machine) or ``slurm`` (a Slurm job per run through submitit;
    ``executor_options`` as for :class:`~localsgd.engines.slurm.SlurmSession`). Progress
    goes to ``output`` (default stdout): a line per finished run, or a bar in a terminal.
    ``launch``: as for :func:`execute_run`. ``batch_trials``: at most that many runs that
    differ only in optimizer metaparameters, schedule and seed train together in this
    process on an engine that can (:mod:`localsgd.studies.trials`), one run at a time
    (``parallel`` 1, this machine); 1 runs each alone. ``plan``: the store's plan to
    write (default: the study's runs; a study in stages plans more than one stage's runs).
    Returns how many runs ended in each status, skipped ones included.

    The study holds the store's lock while it runs (another study or a single run into
    the same store is refused, naming this process), and the store belongs to it: a store
    of another study, or one holding single runs, is refused unless ``adopt_store``
    (their finished runs then stay in it, and in its reports). Everything is checked --
    configs, data, devices, the store's files and checkpoints -- before anything is
    written; ``ConfigError`` (naming the key or file) otherwise.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}")
    if study.stages:  # its later stages' runs exist only once the earlier ones have finished
        raise ConfigError("a study in stages runs stage by stage: localsgd.studies.stages.run_stages")
    if isinstance(batch_trials, bool) or not isinstance(batch_trials, int) or batch_trials < 1:
        raise ConfigError(f"--batch-trials must be an integer >= 1, got {batch_trials!r}")
    # submitit's local executor (cluster = "local") runs the jobs on this machine's cores.
    here = executor == "local" or (executor_options or {}).get("cluster") == "local"
    check_output_folder("--out", out)
    built = preflight(study.runs, local=here)
    lock = Store.lock_for_study(out)
    try:
        existing = _open_existing(out, study, adopt_store, lock) if out.is_dir() else None
        return _run_study(
            study,
            out,
            existing,
            lock,
            built,
            here=here,
            study_file=study_file,
            retry_failed=retry_failed,
            execute=execute,
            progress=progress,
            output=output,
            parallel=parallel,
            oversubscribe=oversubscribe,
            executor=executor,
            executor_options=executor_options,
            launch=launch,
            batch_trials=batch_trials,
            plan=plan,
        )
    finally:
        lock.release()


STORE_ENTRIES = {"runs", "index.sqlite", "plan.json", "study.toml", "report", "slurm", LOCK, f"{LOCK}.d"}
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


def _open_existing(out: Path, study: Study, adopt: bool, lock: FileLock) -> Store | None:
    """An existing ``out`` folder, locked for this study and checked to be its store
    (None: an empty folder, which becomes the store)."""
    if not check_store_folder(out):
        return None
    lock.acquire()
    if not (out / "index.sqlite").is_file():
        return None
    try:
        store = Store(out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if adopt:
        return store
    try:
        owner = store.owner()
    except RecordError as exc:
        raise ConfigError(f"{exc}; delete it (the study writes it again) or pass --adopt-store") from None
    name = study.section.name
    if owner is not None and owner != name:
        raise ConfigError(
            f"store {out} belongs to study {owner!r}, not {name!r}; give another --out, or pass "
            f"--adopt-store to make it {name!r}'s (the runs {owner!r} finished stay in it, and in its reports)"
        )
    if owner is None and store.run_count():
        raise ConfigError(
            f"store {out} holds {store.run_count()} run(s) recorded by localsgd train, not by a study; give "
            f"another --out, or pass --adopt-store to make it {name!r}'s (those runs stay in it, and in its reports)"
        )
    return store


def _plan_runs(
    study: Study, store: Store | None, retry_failed: bool
) -> tuple[Counter[str], list[RunConfig], set[str]]:
    """What is left to do: (counts of skipped runs, runs to do, ids of those that resume
    from a checkpoint). A run the index calls finished whose folder is gone is done again;
    an unreadable status or checkpoint is a ``ConfigError`` naming the file."""
    counts: Counter[str] = Counter()
    todo: list[RunConfig] = []
    resume: set[str] = set()
    if store is None:
        return counts, list(study.runs), resume
    from localsgd.studies.checkpoints import verify

    for run in study.runs:
        run_id = run.run_id()
        try:
            status = store.status(run_id)
            if status in FINISHED and store.run_dir(run_id).is_dir():
                store.final_status(run_id)  # readable, or the study stops here
            elif status in FINISHED:
                log.warning(
                    "run %s: the index says %s but its folder is gone; it is done again", run_id, status
                )
                status = None
        except RecordError as exc:
            raise ConfigError(
                f"{exc}; delete the folder {store.run_dir(run_id)} to run it again"
                if "delete the run folder" not in str(exc)
                else str(exc)
            ) from None
        if status == "completed" or (status in FINISHED and not retry_failed):
            counts[f"skipped ({status})"] += 1
            continue
        todo.append(run)
        folder = store.resumable(run_id) if status not in FINISHED else None
        if folder is not None and verify(folder, run_id) is not None:
            resume.add(run_id)
    return counts, todo, resume


def _run_study(
    study: Study,
    out: Path,
    existing: Store | None,
    store_lock: FileLock,
    built: dict[str, workloads.Workload],
    *,
    here: bool,
    study_file: Path | None,
    retry_failed: bool,
    execute: Callable[[Any, Store], str] | None,
    progress: bool,
    output: TextIO | None,
    parallel: int | None,
    oversubscribe: bool,
    executor: str,
    executor_options: Mapping[str, Any] | None,
    launch: Callable[[engines.Job], None] | None,
    batch_trials: int,
    plan: Mapping[str, Any] | None = None,
) -> Counter[str]:
    counts, todo, resume = _plan_runs(study, existing, retry_failed)
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

    if existing is None:
        # Nothing was written until every check passed: the new store is made (and locked) now.
        out.mkdir(parents=True, exist_ok=True)
        store_lock.acquire()
        try:
            existing = Store(out)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    store = existing
    store.set_owner(study.section.name)
    if study_file is not None and not (
        (out / "study.toml").exists() and os.path.samefile(study_file, out / "study.toml")
    ):
        shutil.copyfile(study_file, out / "study.toml")
    store.write_plan(
        plan
        if plan is not None
        else {
            "study": study.section.name,
            "description": study.section.description,
            "target": dict(study.section.target),
            "runs": [{"run_id": r.run_id(), **r.to_dict(), **_trial(study, r.run_id())} for r in study.runs],
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
    # A run that resumes from its checkpoint trains alone: trials start from step 0.
    fresh = [run for run in todo if run.run_id() not in resume]
    alone = [[run] for run in todo if run.run_id() in resume]
    queue = iter([*batches(fresh, batch_trials), *alone] if batched else [[run] for run in todo])
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
                run,
                store,
                workload=workload,
                session=sessions.get(run.engine),
                resume=run.run_id() in resume,
                launch=launch,
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
