"""One training run on this process's rank: :func:`train`, which every engine and command
shares, and :class:`SingleRun`, what the training loop (:mod:`localsgd.run.loop`) is
given to train one run.

Every rank runs :func:`train`; the run's engine supplies the replica layout (one replica
per process, or all K stacked) and rank 0 alone writes the run record (environment,
metrics, status, checkpoint) into the run folder it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from localsgd import engines, workloads
from localsgd.distributed import resolve_device
from localsgd.records.record import ErrorInfo, MetricsRow, RunWriter, Status, failed_status
from localsgd.records.store import CHECKPOINTS
from localsgd.run import recipes
from localsgd.run.bookkeeping import (
    completed_status,
    environment,
    evaluate_splits,
    metrics_row,
    plan,
    save_checkpoint,
    stop_rule,
)
from localsgd.run.checkpoints import Checkpoints, rng_state, rows_from_state, rows_state, set_rng_state
from localsgd.run.config import RunConfig
from localsgd.run.loop import Asynchronous, Diverged, Evaluation, Synchronous, TrainingLoop, log_row
from localsgd.run.precision import with_precision
from localsgd.run.tracking import run_writer
from localsgd.util.files import disk_full, no_space

log = logging.getLogger(__name__)


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
    writer = run_writer(config, run_dir)
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
        if no_space(exc):
            # Not the run's failure: it stays unfinished, resumable once there is space.
            raise disk_full(exc, getattr(exc, "filename", None) or run_dir or checkpoints or ".") from None
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
    run = SingleRun(config, engine, writer, rank, world_size, device, workload, saved)
    return TrainingLoop(run, evaluation(run.algorithm, rank)).run()[0]


def evaluation(algorithm: Any, rank: int) -> Evaluation:
    """How a run of ``algorithm`` evaluates: once every worker has finished when its
    workers never wait for one another, at steps all of them reach otherwise."""
    return Asynchronous(rank) if algorithm.capabilities.asynchronous else Synchronous()


class SingleRun:
    """One run on this rank, for :class:`~localsgd.run.loop.TrainingLoop`: one record, one
    learning-rate schedule; a diverged loss ends it (:class:`~localsgd.run.loop.Diverged`,
    recorded as ``diverged``), so does crossing ``train.stop_at``. It checkpoints at sync
    steps and resumes from the checkpoint ``saved`` holds."""

    def __init__(
        self,
        config: RunConfig,
        engine: engines.Engine,
        writer: RunWriter,
        rank: int,
        world_size: int,
        device: torch.device,
        workload: workloads.Workload | None,
        saved: Checkpoints,
    ) -> None:
        self.config, self.engine, self.writer, self.rank = config, engine, writer, rank
        self.device, self.saved = device, saved
        self.workload = workloads.build(config.workload) if workload is None else workload
        self.plan = plan(config, self.workload)
        self.algorithm = config.algorithm_config(self.plan.steps_per_epoch)
        self.stop = stop_rule(self.workload, config)
        self.held = workloads.validation_size(self.workload)
        torch.manual_seed(config.seed)
        model = self.workload.make_model(config.seed).to(device)
        self.trained = with_precision(self.workload, device, config.train.precision)
        self.scaler = getattr(self.trained, "scaler", None)
        self.replicas = engine.replicas(
            self.trained,
            model,
            rank=rank,
            world_size=world_size,
            workers=config.workers,
            device=device,
            delay=config.comm.delay,
            options=config.engine_options,
        )
        self.optimizer = recipes.build_optimizer(
            self.replicas.module, config.optimizer, ndim=self.replicas.param_ndim
        )
        self.replicas.check_optimizer(self.optimizer)
        if rank == 0:
            log.info("rank 0: learning rate: %s", self.warmup().note)
        # A partial of a module-level function: workers an engine starts itself get it pickled.
        self.lr = functools.partial(
            recipes.lr_at,
            total_steps=self.plan.total_steps,
            steps_per_epoch=self.plan.steps_per_epoch,
            base_lr=config.optimizer.lr,
            schedule=config.schedule,
            global_batch=self.plan.global_batch,
        )
        self.crossed = False
        """Whether a row crossed ``train.stop_at``."""
        self.state = saved.load()
        if self.state is not None:
            self.optimizer.load_state_dict(self.state["optimizer"])
            if self.scaler is not None and self.state.get("scaler"):
                self.scaler.load_state_dict(self.state["scaler"])

    def warmup(self) -> recipes.Warmup:
        return recipes.plan_warmup(
            self.config.schedule,
            self.plan.total_steps,
            self.plan.steps_per_epoch,
            self.config.optimizer.lr,
            self.plan.global_batch,
        )

    def begin(self, loop: TrainingLoop) -> None:
        if self.state is not None:
            # After entering: the broadcast on enter would overwrite a restored replica.
            loop.dp.load_state_dict(self.state["data_parallel"])
            loop.restore(self.state)
            self.writer.restore(rows_from_state(self.state["rows"], f"checkpoint of step {loop.step}"))
            log.info("rank %d: resumed from the checkpoint of step %d", self.rank, loop.step)
        self.replicas.begin(
            self.optimizer, self.lr, self.plan.total_steps, self.config.data.batch_size, self.config.seed
        )

    def iterations(self) -> int:
        return int(self.replicas.iterations(self.plan.total_steps))

    def batches(self, loop: TrainingLoop) -> Iterator[Any]:
        batches = iter(self.replicas.batches(self.config.data.batch_size, loop.epoch, self.config.seed))
        for _ in range(loop.batch):  # resumed mid-epoch: the batches consumed before
            next(batches, None)
        if self.state is not None:
            set_rng_state(self.state["rng"])  # as it was at the checkpoint, after those batches
            self.state = None
        return batches

    def set_lr(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step)

    def optimizer_step(self, loss: torch.Tensor, dp: Any) -> torch.Tensor:
        if self.scaler is None:
            self.optimizer.step()
            return loss
        loss = self.trained.unscaled(loss)
        self.replicas.unscale_(self.scaler, dp)  # every worker steps, or none does
        dp.step(self.scaler)  # a skipped step still counts toward the algorithm's schedule
        self.scaler.update()
        return loss

    def end_training(self) -> None:
        self.replicas.finish()

    def train_losses(self, loop: TrainingLoop) -> dict[int, tuple[float, int]]:
        mean, steps = self.replicas.mean_loss(loop.loss_sum, loop.loss_count)
        return {0: loop.evaluation.train_loss(self.replicas, loop, mean, steps)}

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        return self.replicas.evaluating()

    def evaluate(self, loop: TrainingLoop, index: int, train_loss: float | None) -> MetricsRow:
        scores, validation = evaluate_splits(self.replicas, self.held)
        row = metrics_row(
            self.workload,
            loop.dp.stats,
            self.plan,
            step=loop.step,
            train_seconds=loop.train_seconds,
            lr=self.optimizer.param_groups[0]["lr"],
            train_loss=train_loss,
            scores=scores,
            validation=validation,
            worker_steps=self.replicas.worker_steps(loop.step),
            updates=self.replicas.updates(loop.dp),
        )
        self.writer.row(row)
        if self.rank == 0:
            log_row(row, workloads.metric(self.workload), "rank 0")
        return row

    def diverged(self, loop: TrainingLoop, index: int, message: str) -> None:
        raise Diverged(message)

    def stopped(self, loop: TrainingLoop, index: int) -> None:
        self.crossed = True

    def done(self) -> bool:
        return self.crossed

    def checkpoint(self, loop: TrainingLoop) -> None:
        if not (loop.synced and self.saved.wanted(loop.step)):
            return
        state = {
            **loop.position(),
            "data_parallel": loop.dp.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "rows": rows_state(self.writer.rows),
        }
        self.saved.save(state, barrier=lambda: self.replicas.worker_mean(torch.ones(()), loop.dp))

    def finish(self, loop: TrainingLoop) -> list[Status]:
        if self.writer.run_dir is not None:
            save_checkpoint(self.writer.run_dir, self.replicas.final_model(), self.config, loop.step)
            # A later stage loads it.
            workloads.export_model(self.workload, self.replicas.final_model(), self.writer.run_dir)
        status = completed_status(
            self.workload,
            self.writer.rows,
            loop.dp.stats,
            self.plan,
            step=loop.step,
            train_seconds=loop.train_seconds,
            algorithm=self.algorithm.to_dict(),
            engine=self.engine.info,
            details={**self.replicas.details(), **loop.dp.details},
            resumed=loop.resumed,
            worker_steps=self.replicas.worker_steps(loop.step),
            schedule=self.warmup().to_dict(),
        )
        return [status]
