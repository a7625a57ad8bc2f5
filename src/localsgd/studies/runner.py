"""Running runs: one run through its engine into a store, and every run of a study once,
resumable, with progress and an ETA.

A study runs its runs through engine sessions (:class:`~localsgd.engines.Session`), whose
worker pools stay up from one run to the next; ``parallel`` runs go at once, each on
sessions of its own, and never more worker threads than the machine has cores unless the
caller insists. ``executor = "slurm"`` submits each run as a Slurm job instead
(:mod:`localsgd.studies.executors.slurm`), into the same store."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from localsgd import engines, workloads
from localsgd.records.lock import FileLock
from localsgd.records.record import RecordError
from localsgd.records.store import FINISHED, Store
from localsgd.run.config import RunConfig
from localsgd.run.execute import check_store_folder, execute_run, preflight
from localsgd.run.trials import DEFAULT_BATCH, batches, execute_trials
from localsgd.studies.executors.local import Sessions, check_parallel, run_slots
from localsgd.studies.grid import Study
from localsgd.util.checks import ConfigError, check_output_folder

log = logging.getLogger(__name__)


EXECUTORS = ("local", "slurm")


def _trial(study: Study, run_id: str) -> dict[str, Any]:
    """A planned run's search entry (block, trial, searched keys), when it is a trial."""
    trial = study.trials.get(run_id)
    return {} if trial is None else {"search": trial}


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
    ``executor_options`` as for :class:`~localsgd.studies.executors.slurm.SlurmSession`). Progress
    goes to ``output`` (default stdout): a line per finished run, or a bar in a terminal.
    ``launch``: as for :func:`execute_run`. ``batch_trials``: at most that many runs that
    differ only in optimizer metaparameters, schedule and seed train together in this
    process on an engine that can (:mod:`localsgd.run.trials`), one run at a time
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
        if _resumes(store, run_id, status):
            resume.add(run_id)
    return counts, todo, resume


def _resumes(store: Store, run_id: str, status: str | None) -> bool:
    """Whether run ``run_id`` (to do) resumes from a checkpoint (one that cannot is a
    ``CheckpointError``); a warning says so, and says when the work an interrupted attempt
    left is dropped for want of one."""
    from localsgd.run.checkpoints import verify

    folder = store.resumable(run_id) if status not in FINISHED else None
    step = verify(folder, run_id) if folder is not None else None
    if folder is not None and step is not None:
        log.warning("run %s: %s: resumes from its checkpoint of step %d", run_id, folder, step)
        return True
    partial = store.partial_dir(run_id)
    if partial.is_dir() and folder is None:  # a checkpoint none of which is whole: said by verify
        log.warning(
            "run %s: %s: left unfinished without a checkpoint; it starts again from step 0", run_id, partial
        )
    return False


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
    options = dict(executor_options or {})
    if executor == "slurm":
        from localsgd.studies.executors.slurm import SlurmSession

        SlurmSession.check_options(options, todo)
    # Nothing was written until every check passed: the store is made (and locked) now.
    store = _open_store(out, existing, store_lock)
    _write_plan(store, study, study_file, plan)
    if not todo:
        return counts
    from localsgd.studies.progress import StudyProgress

    reporter = StudyProgress(study.section.name, len(todo), parallel=parallel, output=output)
    work = _StudyWork(store, built, resume, counts, execute, launch, reporter if progress else None)
    # Trials share this process's global state (RNG, threads): batched only when alone here.
    batched = execute is None and executor == "local" and parallel == 1
    slots = _slot_sessions(executor, options, store, parallel)
    with reporter if progress else contextlib.nullcontext():
        if progress:
            reporter.say(_opening_line(study, len(todo), sum(counts.values()), parallel, executor, here, out))
        run_slots(work.queue(todo, batch_trials if batched else 0), slots, work.one_batch)
    return counts


def _open_store(out: Path, existing: Store | None, lock: FileLock) -> Store:
    """The study's store: the existing one, or a new one made and locked now."""
    if existing is not None:
        return existing
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    try:
        return Store(out)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _write_plan(store: Store, study: Study, study_file: Path | None, plan: Mapping[str, Any] | None) -> None:
    """The store becomes the study's: its owner, a copy of the study file and the plan."""
    out = store.root
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


def _slot_sessions(executor: str, options: dict[str, Any], store: Store, parallel: int) -> list[Sessions]:
    """Each slot's sessions: one Slurm session per engine shared by every slot, or a
    slot's own sessions on this machine."""
    if executor == "slurm":
        from localsgd.studies.executors.slurm import SlurmSession

        shared = Sessions(lambda engine: SlurmSession(engine, store.root / "slurm", options))
        return [shared] * parallel
    # A run of one process may train in this process only when it is alone: runs in
    # threads would share its global state (RNG, thread count).
    return [Sessions(lambda engine: engine.session(in_process=parallel == 1)) for _ in range(parallel)]


def _opening_line(study: Study, todo: int, skipped: int, parallel: int, executor: str, here: bool, out: Path) -> str:
    where = "on this machine" if executor == "local" else "as Slurm jobs"
    if executor == "slurm" and here:
        where += " (submitit's local executor)"
    return (
        f"study {study.section.name}: {todo} run(s) to do ({skipped} finished before), "
        f"{parallel} at a time {where}; store {out}"
    )


class _StudyWork:
    """What a slot does with the runs it takes: one run through its session, or a batch of
    trials in this process; counts and progress as each finishes."""

    def __init__(
        self,
        store: Store,
        built: dict[str, workloads.Workload],
        resume: set[str],
        counts: Counter[str],
        execute: Callable[[Any, Store], str] | None,
        launch: Callable[[engines.Job], None] | None,
        reporter: Any,
    ) -> None:
        self.store = store
        self.built = built
        self.resume = resume
        self.counts = counts
        self.execute = execute
        self.launch = launch
        self.reporter = reporter
        self.lock = threading.Lock()

    def queue(self, todo: list[RunConfig], batch_trials: int) -> list[list[RunConfig]]:
        """The runs in the order they go, in batches of trials when ``batch_trials`` > 0. A
        run that resumes from its checkpoint trains alone: trials start from step 0."""
        if batch_trials <= 0:
            return [[run] for run in todo]
        fresh = [run for run in todo if run.run_id() not in self.resume]
        alone = [[run] for run in todo if run.run_id() in self.resume]
        return [*batches(fresh, batch_trials), *alone]

    def workload(self, run: RunConfig) -> workloads.Workload:
        return self.built[json.dumps(run.workload, sort_keys=True)]

    def one_batch(self, runs: list[RunConfig], sessions: Sessions) -> None:
        if len(runs) == 1:
            self.one(runs[0], sessions)
            return
        if self.reporter is not None:
            for run in runs:
                self.reporter.started(run)
        started = time.monotonic()
        workload = self.workload(runs[0])
        statuses = execute_trials(runs, self.store, workload=workload)
        seconds = (time.monotonic() - started) / len(runs)  # what each trial cost
        for run, status in zip(runs, statuses):
            self.finished(run, status, seconds, workload)

    def one(self, run: RunConfig, sessions: Sessions) -> None:
        if self.reporter is not None:
            self.reporter.started(run)
        started = time.monotonic()
        workload = self.workload(run)
        if self.execute is not None:
            status = self.execute(run, self.store)
        else:
            status = execute_run(
                run,
                self.store,
                workload=workload,
                session=sessions.get(run.engine),
                resume=run.run_id() in self.resume,
                launch=self.launch,
            )
        self.finished(run, status, time.monotonic() - started, workload)

    def finished(self, run: RunConfig, status: str, seconds: float, workload: workloads.Workload) -> None:
        with self.lock:
            self.counts[status] += 1
        if self.reporter is not None:
            info = self.store.final_status(run.run_id())
            self.reporter.finished(run, status, info, seconds, workloads.metric(workload))
        elif status != "completed":
            error = self.store.error(run.run_id())
            log.warning("run %s (%s) %s: %s", run.run_id(), run.name, status, error.line() if error else "")
