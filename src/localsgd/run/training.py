"""One training run on this process's rank: the loop every engine and command shares.

Every rank runs :func:`train`; the run's engine supplies the replica layout (one replica
per process, or all K stacked) and rank 0 alone writes the run record (environment,
metrics, status, checkpoint) into the run folder it is given.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from localsgd import engines, workloads
from localsgd.distributed import resolve_device
from localsgd.records.record import (
    RECORD_VERSION,
    Counters,
    Environment,
    ErrorInfo,
    Metric,
    MetricsRow,
    RunWriter,
    Status,
    failed_status,
    now,
)
from localsgd.records.store import CHECKPOINTS
from localsgd.run import recipes
from localsgd.run.checkpoints import Checkpoints, rng_state, rows_from_state, rows_state, set_rng_state
from localsgd.run.config import RunConfig
from localsgd.run.precision import with_precision
from localsgd.util.checks import ConfigError

log = logging.getLogger(__name__)


class Diverged(Exception):
    """The training loss became NaN or infinite."""


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


def train(
    config: RunConfig,
    run_dir: Path | None,
    rank: int,
    world_size: int,
    backend: str | None = None,
    *,
    workload: workloads.Workload | None = None,
    checkpoints: Path | None = None,
) -> Status:
    """Train ``config`` on this rank; ``run_dir`` is where rank 0 writes the record (other
    ranks pass None). ``workload`` is the built workload when the caller has it already.
    ``checkpoints``: this run's checkpoint folder, which every rank must reach (default:
    ``run_dir/checkpoints``); a checkpoint found there is resumed from
    (:mod:`localsgd.run.checkpoints`).

    Returns the status (also written as ``status.json``). Errors are recorded as failed
    and re-raised; divergence is recorded as ``diverged`` and returned; an interruption
    (KeyboardInterrupt) leaves the run unfinished, as it was at its last checkpoint.
    """
    engine = engines.get(config.engine)
    engines.check_world(engine, config.workers, world_size, config.engine_options)
    device = resolve_device(config.device)
    torch.set_num_threads(config.threads)
    if checkpoints is None and run_dir is not None:
        checkpoints = run_dir / CHECKPOINTS
    # Workers that step without waiting for one another have no step at which all of them
    # could checkpoint together: such runs take no mid-run checkpoints (they restart).
    every = 0 if config.steps_alone() else config.train.checkpoint_every
    saved = Checkpoints(checkpoints, rank, world_size, every, config.run_id())
    writer = RunWriter(run_dir)
    status: Status
    try:
        writer.environment(environment(world_size, backend, device))
        status = _train(config, engine, writer, rank, world_size, device, workload, saved)
    except Diverged as exc:
        status = failed_status(ErrorInfo("Diverged", str(exc), rank=rank), writer.rows)
        status = dataclasses.replace(status, status="diverged")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        writer.status(failed_status(ErrorInfo.from_exception(exc, rank), writer.rows))
        raise
    finally:
        writer.close()
    writer.status(status)
    return status


def _train(
    config: RunConfig,
    engine: engines.Engine,
    writer: RunWriter,
    rank: int,
    world_size: int,
    device: torch.device,
    workload: workloads.Workload | None,
    saved: Checkpoints,
) -> Status:
    import localsgd

    if workload is None:
        workload = workloads.build(config.workload)
    primary = workloads.metric(workload)
    workers = config.workers
    batch = config.data.batch_size
    run = plan(config, workload)
    steps_per_epoch, total_steps = run.steps_per_epoch, run.total_steps
    algorithm = config.algorithm_config(steps_per_epoch)
    stop = stop_rule(workload, config)
    held = workloads.validation_size(workload)
    torch.manual_seed(config.seed)
    model = workload.make_model(config.seed).to(device)
    trained = with_precision(workload, device, config.train.precision)
    scaler = getattr(trained, "scaler", None)
    replicas = engine.replicas(
        trained,
        model,
        rank=rank,
        world_size=world_size,
        workers=workers,
        device=device,
        delay=config.comm.delay,
        options=config.engine_options,
    )
    optimizer = recipes.build_optimizer(replicas.module, config.optimizer, ndim=replicas.param_ndim)
    replicas.check_optimizer(optimizer)
    global_batch = batch * workers
    if rank == 0:
        warmup = recipes.plan_warmup(
            config.schedule, total_steps, steps_per_epoch, config.optimizer.lr, global_batch
        )
        log.info("rank 0: learning rate: %s", warmup.note)

    # A partial of a module-level function: workers an engine starts itself get it pickled.
    lr = functools.partial(
        recipes.lr_at,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        base_lr=config.optimizer.lr,
        schedule=config.schedule,
        global_batch=global_batch,
    )

    step = 0
    stopped = False
    train_seconds = 0.0
    loss_sum: torch.Tensor | float = 0.0
    loss_count = 0
    epoch, done = 0, 0  # done: batches of this epoch consumed
    resumed: tuple[int, ...] = ()
    # An asynchronous algorithm (a parameter server): workers never wait for one another,
    # so only rank 0 evaluates (the global model, without any collective), and the final
    # evaluation comes once, after every worker has finished.
    deferred = bool(getattr(algorithm, "asynchronous", False))
    evaluates = rank == 0 or not deferred
    state = saved.load()
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    with localsgd.DataParallel(
        replicas.module, optimizer, algorithm, comm=replicas.comm, flat=replicas.flat
    ) as dp:
        if state is not None:
            # After entering: the broadcast on enter would overwrite a restored replica.
            dp.load_state_dict(state["data_parallel"])
            step, epoch, done = int(state["step"]), int(state["epoch"]), int(state["batch"])
            train_seconds, loss_sum, loss_count = (
                state["train_seconds"],
                state["loss_sum"],
                state["loss_count"],
            )
            resumed = (*state["resumed"], step)
            writer.restore(rows_from_state(state["rows"], f"checkpoint of step {step}"))
            log.info("rank %d: resumed from the checkpoint of step %d", rank, step)
        replicas.begin(optimizer, lr, total_steps, batch, config.seed)
        iterations = replicas.iterations(total_steps)

        def checkpoint() -> None:
            saved.save(
                {
                    "step": step,
                    "epoch": epoch,
                    "batch": done,
                    "train_seconds": train_seconds,
                    "loss_sum": loss_sum,
                    "loss_count": loss_count,
                    "data_parallel": dp.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng_state(),
                    "rows": rows_state(writer.rows),
                    "resumed": resumed,
                },
                barrier=lambda: replicas.worker_mean(torch.ones(()), dp),
            )

        def evaluate(*, final: bool = False) -> MetricsRow | None:
            nonlocal loss_sum, loss_count
            mean, steps = replicas.mean_loss(loss_sum, loss_count)
            counted = loss_count
            loss_sum, loss_count = 0.0, 0
            if not evaluates:
                return None
            if deferred:
                # The evaluating worker's own (rank 0's, replica 0's): a mean over workers
                # would be a collective.
                train_loss = float(torch.as_tensor(mean).reshape(-1)[0])
                counted = int(torch.as_tensor(steps).reshape(-1)[0])  # none: no train loss
            else:
                train_loss = replicas.worker_mean(torch.as_tensor(mean, dtype=torch.float64), dp)
            if final:
                scores, validation = evaluate_splits(replicas, held)  # the final global model is in place
            else:
                with replicas.evaluating(), dp.consensus():
                    scores, validation = evaluate_splits(replicas, held)
            row = metrics_row(
                workload,
                dp.stats,
                run,
                step=step,
                train_seconds=train_seconds,
                lr=optimizer.param_groups[0]["lr"],
                train_loss=train_loss if counted else None,
                scores=scores,
                validation=validation,
                worker_steps=replicas.worker_steps(step),
                updates=replicas.updates(dp),
            )
            writer.row(row)
            if rank == 0:
                log_row(row, primary, "rank 0")
            if not math.isfinite(train_loss):
                # Every rank sees the same averaged loss, so all stop together.
                raise Diverged(f"train loss is {train_loss} at step {step}")
            return row

        def crossed(row: MetricsRow | None) -> bool:
            # The consensus model's metrics are the same on every rank: all stop together.
            return stop is not None and row is not None and stop.crossed(row)

        all_steps = replicas.worker_steps(iterations)
        while step < iterations:
            batches = iter(replicas.batches(batch, epoch, config.seed))
            for _ in range(done):  # resumed mid-epoch: the batches consumed before
                next(batches, None)
            if state is not None:
                set_rng_state(state["rng"])  # as it was at the checkpoint, after those batches
                state = None
            while True:
                start = time.perf_counter()  # data loading and augmentation count as training
                data = next(batches, None)
                if data is None:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr(step)
                optimizer.zero_grad()
                loss = replicas.forward_backward(data)
                syncs = dp.stats["syncs"] if saved.wanted(step + 1) else None
                if scaler is not None:
                    loss = trained.unscaled(loss)
                    replicas.unscale_(scaler, dp)  # every worker steps, or none does
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                loss_sum = loss_sum + loss
                loss_count += 1
                step += 1
                done += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_seconds += time.perf_counter() - start
                at_end = step == iterations
                if at_end:
                    # Workers the engine started itself (Hogwild's helpers) finish: training time.
                    joining = time.perf_counter()
                    replicas.finish()
                    train_seconds += time.perf_counter() - joining
                # An asynchronous run's final evaluation waits for every worker (below); a
                # simulated schedule's last steps may hold every replica still: no worker
                # steps after this one, so no evaluation here either.
                no_more = at_end or replicas.worker_steps(step) >= all_steps
                if (step % config.train.eval_every == 0 or at_end) and not (deferred and no_more):
                    stopped = crossed(evaluate())
                if step >= iterations or stopped:
                    break
                if syncs is not None and dp.stats["syncs"] > syncs:
                    checkpoint()
            if stopped:
                break
            epoch, done = epoch + 1, 0
        finishing = time.perf_counter()
        # Leaving the block puts the consensus model on every rank (an asynchronous run's
        # once every worker has finished: that wait is training time).
    if deferred:
        train_seconds += time.perf_counter() - finishing
        evaluate(final=True)
    if writer.run_dir is not None:
        save_checkpoint(writer.run_dir, replicas.final_model(), config, step)
        workloads.export_model(workload, replicas.final_model(), writer.run_dir)  # a later stage loads it
    return completed_status(
        workload,
        writer.rows,
        dp.stats,
        run,
        step=step,
        train_seconds=train_seconds,
        algorithm=algorithm.to_dict(),
        engine=engine.info,
        details={**replicas.details(), **dp.details},
        resumed=resumed,
        worker_steps=replicas.worker_steps(step),
        schedule=recipes.plan_warmup(
            config.schedule, total_steps, steps_per_epoch, config.optimizer.lr, global_batch
        ).to_dict(),
    )


# -- what every training loop shares (this one, and trials batched in one process) ---------


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


def log_row(row: MetricsRow, primary: Any, who: str) -> None:
    log.info(
        "%s step %d epoch %.2f: train loss %.4f, %s %s",
        who,
        row.step,
        row.epoch,
        row.train_loss if row.train_loss is not None else math.nan,
        primary.title,
        primary.show(row.metrics.get(primary.name)),
    )


def save_checkpoint(run_dir: Path, model: torch.nn.Module, config: RunConfig, step: int) -> None:
    tmp = run_dir / ".checkpoint.pt.tmp"
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "step": step}, tmp)
    os.replace(tmp, run_dir / "checkpoint.pt")


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
