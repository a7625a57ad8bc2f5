"""What every run counts and writes, however it was trained (alone, resumed, batched with
other trials, asynchronously): how long it trains (:class:`Plan`), when it stops early
(:class:`StopRule`), and the parts of its record: the environment, the metrics rows, the
status of a completed run and its final model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from localsgd import workloads
from localsgd.records.record import (
    RECORD_VERSION,
    Counters,
    Environment,
    Metric,
    MetricsRow,
    Status,
    now,
)
from localsgd.run.config import RunConfig
from localsgd.util.checks import ConfigError
from localsgd.util.files import save_torch


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(world_size: int, backend: str | None, device: torch.device) -> Environment:
    import numpy

    import localsgd

    return Environment(
        version=RECORD_VERSION,
        python=sys.version.split()[0],
        torch=torch.__version__,
        numpy=numpy.__version__,
        localsgd=localsgd.__version__,
        git_sha=git_sha(),
        host=socket.gethostname(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        command=tuple(sys.argv),
        world_size=world_size,
        backend=backend,
        device=str(device),
        cuda=torch.version.cuda if torch.cuda.is_available() else None,
        started_at=now(),
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long a run trains, in the units its record counts."""

    steps_per_epoch: int
    total_steps: int
    global_batch: int
    """K·B: samples per step over all workers."""


def plan(config: RunConfig, workload: workloads.Workload) -> Plan:
    """Steps per epoch, the run's total steps and its global batch."""
    steps_per_epoch = workload.steps_per_epoch(config.workers, config.data.batch_size)
    total_steps = math.ceil(config.train.epochs * steps_per_epoch)
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    return Plan(steps_per_epoch, total_steps, config.data.batch_size * config.workers)


def metrics_row(
    workload: workloads.Workload,
    stats: dict[str, Any],
    run: Plan,
    *,
    step: int,
    train_seconds: float,
    lr: float,
    train_loss: float | None,
    scores: dict[str, float],
    validation: dict[str, float] | None = None,
    worker_steps: float | None = None,
    updates: int | None = None,
) -> MetricsRow:
    """One evaluation's row of the metrics stream. ``worker_steps``: the steps one worker
    took by the loop's ``step`` when they differ (a simulated schedule of unequal speeds);
    ``updates``: the model updates so far, where the engine counts them."""
    done = float(step) if worker_steps is None else worker_steps
    return MetricsRow(
        step=round(done),
        epoch=done / run.steps_per_epoch,
        samples=round(done * run.global_batch),
        wall_seconds=train_seconds,
        lr=lr,
        train_loss=train_loss,
        metrics={m.name: _float(scores.get(m.name)) for m in workload.metrics},
        validation={m.name: _float(validation.get(m.name)) for m in workload.metrics} if validation else {},
        bytes=stats["bytes"],
        syncs=stats["syncs"],
        collectives=stats["collectives"],
        comm_seconds=stats["comm_seconds"],
        by_scope=stats["by_scope"],
        updates=updates,
        updates_per_second=updates / train_seconds if updates is not None and train_seconds > 0 else None,
    )


def save_checkpoint(run_dir: Path, model: torch.nn.Module, config: RunConfig, step: int) -> None:
    save_torch({"model": model.state_dict(), "config": config.to_dict(), "step": step}, run_dir / "checkpoint.pt")


def completed_status(
    workload: workloads.Workload,
    rows: list[MetricsRow],
    final: dict[str, Any],
    run: Plan,
    *,
    step: int,
    train_seconds: float,
    algorithm: dict[str, Any],
    engine: Any,
    details: dict[str, Any],
    resumed: tuple[int, ...] = (),
    worker_steps: float | None = None,
    schedule: dict[str, Any] | None = None,
) -> Status:
    """The status of a run that trained to the end; ``final``: its last counters;
    ``resumed``: the steps of the checkpoints it resumed from; ``worker_steps``: the steps
    one worker took by the loop's ``step`` when they differ (see :func:`metrics_row`)."""
    last = rows[-1] if rows else None
    worker = round(step if worker_steps is None else worker_steps)
    done = float(step) if worker_steps is None else worker_steps
    return Status(
        version=RECORD_VERSION,
        status="completed",
        steps=worker,
        epochs=done / run.steps_per_epoch,
        samples=round(done * run.global_batch),
        wall_seconds=train_seconds,
        metrics=tuple(workload.metrics),
        primary=workload.primary,
        best={
            m.name: _finite_or_none(m.best([r.metrics.get(m.name) for r in rows])) for m in workload.metrics
        },
        best_validation={
            m.name: _finite_or_none(m.best([r.validation.get(m.name) for r in rows]))
            for m in workload.metrics
            if any(r.validation for r in rows)
        },
        splits=splits(workload),
        schedule=schedule or {},
        final=last,
        counters=Counters(
            # Less the loop's steps that were no worker's step (a simulated schedule's held
            # steps): the steps one worker took, as a worker process counts them.
            steps=final["steps"] - (step - worker),
            syncs=final["syncs"],
            collectives=final["collectives"],
            bytes=final["bytes"],
            comm_seconds=final["comm_seconds"],
            by_scope=final["by_scope"],
        ),
        steps_per_epoch=run.steps_per_epoch,
        total_steps=run.total_steps,
        global_batch=run.global_batch,
        algorithm=algorithm,
        engine=engine,
        details=details,
        resumed=resumed,
    )


@dataclasses.dataclass(frozen=True)
class StopRule:
    """``train.stop_at`` resolved: stop at the first row whose ``metric`` on ``split``
    strictly crosses ``value``."""

    metric: Metric
    value: float
    split: str

    def crossed(self, row: MetricsRow) -> bool:
        value = (row.validation if self.split == "validation" else row.metrics).get(self.metric.name)
        return value is not None and self.metric.crossed(value, self.value)


def stop_rule(workload: workloads.Workload, config: RunConfig) -> StopRule | None:
    """``train.stop_at`` on ``train.stop_split``; ``ConfigError`` for an undeclared metric,
    or for the validation split of a workload that holds none out."""
    stop = config.train.stop_metric()
    if stop is None:
        return None
    names = [m.name for m in workload.metrics]
    if stop[0] not in names:
        raise ConfigError(
            f"train.stop_at = {config.train.stop_at!r}: {workload.name} has the metrics {names}"
        )
    split = config.train.stop_split
    if split == "validation" and not workloads.validation_size(workload):
        raise ConfigError(
            f"train.stop_at = {config.train.stop_at!r} reads the validation split, which {workload.name} "
            "does not hold out: set workload.validation_fraction > 0, or train.stop_split = 'test'"
        )
    return StopRule(workloads.metric(workload, stop[0]), stop[1], split)


def evaluate_splits(replicas: Any, held: int) -> tuple[dict[str, float], dict[str, float]]:
    """The model in place evaluated on test and, when the workload holds ``held`` > 0
    examples out, on validation."""
    return replicas.evaluate("test"), replicas.evaluate("validation") if held else {}


def splits(workload: workloads.Workload) -> dict[str, str]:
    """What the rows' ``metrics`` and ``validation`` were evaluated on, for the record."""
    held = workloads.validation_size(workload)
    return {
        "metrics": "test split",
        "validation": (
            f"validation split: {held} examples held out of the training data, never trained on"
            if held
            else "none: the workload holds no validation split out"
        ),
    }


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
