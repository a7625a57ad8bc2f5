"""Running a study: every planned run once, resumable, with a progress bar and ETA."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localsgd.studies.grid import Study
from localsgd.studies.store import FINISHED, Store

log = logging.getLogger(__name__)


def run_study(
    study: Study,
    out: Path,
    *,
    study_file: Path | None = None,
    retry_failed: bool = False,
    execute: Callable[[Any, Store], str] | None = None,
    progress: bool = True,
) -> Counter[str]:
    """Run every run of ``study`` not already finished in the store at ``out``.

    Completed (and, unless ``retry_failed``, failed and diverged) runs are skipped; a run
    left unfinished by an interrupted study starts again from scratch. Returns how many
    runs ended in each status, skipped ones included.
    """
    if execute is None:
        from localsgd.engines.processes import execute as execute_processes

        execute = execute_processes
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
                log.warning("run %s (%s) %s", run.run_id(), label, status)
            bar.update(task, advance=1, last=f"{status}: {label}")
    return counts
