"""Running runs: one run through its engine into a store, and every run of a study once,
resumable, with a progress bar and ETA."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from localsgd import engines, workloads
from localsgd.records.record import ErrorInfo
from localsgd.records.store import FINISHED, Store
from localsgd.studies.grid import Study
from localsgd.studies.schema import RunConfig
from localsgd.util.checks import ConfigError

log = logging.getLogger(__name__)


def preflight(runs: Iterable[RunConfig]) -> dict[str, workloads.Workload]:
    """Check what can be checked before any run record exists: every distinct workload is
    built once (its data paths read, an import-path factory called and its result checked),
    and every run's batch fits its workload. Returns the built workloads by spec.
    ``ConfigError`` naming the key otherwise."""
    built: dict[str, workloads.Workload] = {}
    for run in runs:
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
        try:
            built[key].steps_per_epoch(run.workers, run.data.batch_size)
        except ValueError as exc:
            raise ConfigError(
                f"data.batch_size = {run.data.batch_size} with workers = {run.workers}: {exc}"
            ) from None
    return built


def execute_run(
    config: RunConfig,
    store: Store,
    *,
    timeout: float | None = None,
    workload: workloads.Workload | None = None,
    launch: Callable[[engines.Job], None] | None = None,
) -> str:
    """Run ``config`` to the end through its engine and record it in ``store``; returns
    the final status. A failed run's status holds its root error (the first worker's own
    exception). ``launch`` places a run of several worker processes somewhere else than the
    engine would (an emulated multi-node cluster, say); a run of one process stays here."""
    from localsgd.studies.trainer import train

    engine = engines.get(config.engine)
    run_id = config.run_id()
    folder = store.begin(run_id, config.name, config.to_dict())

    def train_here(rank: int, world_size: int) -> None:
        train(config, folder, rank, world_size, workload=workload)

    error: ErrorInfo | None = None
    try:
        job = engines.Job(config.workers, config.threads, folder, train_here, timeout)
        if launch is not None and engine.processes(config.workers) > 1:
            launch(job)
        else:
            engine.execute(job)
    except engines.WorkerFailure as exc:
        error = exc.error
    except Exception as exc:  # a run trained in this process: recorded as failed, the study goes on
        error = ErrorInfo.from_exception(exc)
    return store.finish(run_id, error=error)


def run_study(
    study: Study,
    out: Path,
    *,
    study_file: Path | None = None,
    retry_failed: bool = False,
    execute: Callable[[Any, Store], str] | None = None,
    progress: bool = True,
    launch: Callable[[engines.Job], None] | None = None,
) -> Counter[str]:
    """Run every run of ``study`` not already finished in the store at ``out``.

    Completed (and, unless ``retry_failed``, failed and diverged) runs are skipped; a run
    left unfinished by an interrupted study starts again from scratch. Returns how many
    runs ended in each status, skipped ones included. ``launch``: as for
    :func:`execute_run`.
    """
    built = preflight(study.runs)
    if execute is None:

        def execute(run: RunConfig, store: Store) -> str:
            key = json.dumps(run.workload, sort_keys=True)
            return execute_run(run, store, workload=built[key], launch=launch)

    store = Store(out)
    if study_file is not None and not (
        (out / "study.toml").exists() and os.path.samefile(study_file, out / "study.toml")
    ):
        shutil.copyfile(study_file, out / "study.toml")
    store.write_plan(
        {
            "study": study.section.name,
            "description": study.section.description,
            "runs": [{"run_id": r.run_id(), **r.to_dict()} for r in study.runs],
        },
    )
    counts: Counter[str] = Counter()
    todo = []
    for run in study.runs:
        status = store.status(run.run_id())
        keep = status == "completed" or (status in FINISHED and not retry_failed)
        if keep:
            counts[f"skipped ({status})"] += 1
        else:
            todo.append(run)
    if not todo:
        return counts
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[last]}"),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(study.section.name, total=len(todo), last="")
        for run in todo:
            label = f"K={run.workers} {json.dumps(run.algorithm, sort_keys=True)} seed={run.seed}"
            bar.update(task, last=f"running {label}")
            status = execute(run, store)
            counts[status] += 1
            if status != "completed":
                error = store.error(run.run_id())
                log.warning("run %s (%s) %s: %s", run.run_id(), label, status, error.line() if error else "")
            bar.update(task, advance=1, last=f"{status}: {label}")
    return counts
