"""Trials batched in one process: runs of one model shape that differ only in their
optimizer's metaparameters (learning rate, momentum, weight decay), their schedule and
their seed train together as independent groups of replicas on an engine that can
(:class:`~localsgd.engines.TrialBatching`: the simulated engine), and each is recorded as
its own run, as if it had run alone.

A metaparameter search of R trials of K workers then costs about one simulation of R·K
replicas. Exact against the trials run one by one (the same parameters after N steps, to
float rounding) for models without dropout: dropout draws from one generator for all
trials here, so its masks differ from a run's own. Each trial's ``wall_seconds`` is its
share of the batch's training time (the batch's over R), and its status says how many
trials shared it and the batch's time (``details.trials_batched``,
``details.batch_wall_seconds``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from localsgd import engines, workloads
from localsgd.distributed import resolve_device
from localsgd.records.group import GroupWrite
from localsgd.records.record import ErrorInfo, MetricsRow, RunWriter, Status, failed_status
from localsgd.records.store import Store
from localsgd.run import recipes
from localsgd.run.bookkeeping import (
    completed_status,
    environment,
    metrics_row,
    plan,
    stop_rule,
)
from localsgd.run.config import RunConfig
from localsgd.run.loop import Synchronous, TrainingLoop, log_row
from localsgd.run.tracking import run_writer

TRIAL_FIELDS = ("name", "seed", "optimizer.lr", "optimizer.momentum", "optimizer.weight_decay", "schedule")
"""What runs batched together may differ in (``schedule``: the whole section, so a new
kind of schedule batches too: each trial's rate comes from :func:`recipes.lr_at`)."""

DEFAULT_BATCH = 64
"""Trials per batch unless a study says otherwise (``--batch-trials``)."""


def batch_key(config: RunConfig, data: dict[str, Any] | None = None) -> str | None:
    """What a run must share with the others of its batch (its config without
    :data:`TRIAL_FIELDS`), or None when it cannot be batched: its engine does not declare
    ``TRIAL_BATCHING``, its optimizer is not the SGD that :class:`ReplicaSGD` steps
    (``OptimizerConfig.batchable``: not ``lr_inside``), it trains in reduced precision, it has
    engine options (worker speeds) or its algorithm declares itself asynchronous. An
    algorithm that declares it reads the inner learning rate (``reads_inner_lr``) keeps
    ``optimizer.lr`` and ``schedule`` in the key. ``data``: ``config.to_dict()`` when the
    caller has it already (it is left as it is)."""
    if engines.Capability.TRIAL_BATCHING not in engines.get(config.engine).capabilities:
        return None
    if not config.optimizer.batchable or config.train.precision != "fp32":
        return None
    declared = config.algorithm_config(steps_per_epoch=1).capabilities
    if config.engine_options or declared.asynchronous:
        # Worker speeds and a parameter server's schedule belong to one world of replicas;
        # trials are several worlds stepped together.
        return None
    data = config.to_dict() if data is None else {**data, "optimizer": dict(data["optimizer"])}
    for dotted in TRIAL_FIELDS:
        if declared.reads_inner_lr and dotted in ("optimizer.lr", "schedule"):
            continue
        section, _, key = dotted.rpartition(".")
        (data[section] if section else data).pop(key)
    return json.dumps(data, sort_keys=True)


def batches(runs: Sequence[RunConfig], size: int) -> list[list[RunConfig]]:
    """``runs`` in batches of at most ``size`` that share a :func:`batch_key`, in the order
    of their first run; a run that cannot be batched (or ``size`` <= 1) is a batch of one."""
    groups: dict[str, list[RunConfig]] = {}
    out: list[list[RunConfig]] = []
    for run in runs:
        key = batch_key(run) if size > 1 else None
        if key is None:
            out.append([run])
            continue
        if key not in groups or len(groups[key]) >= size:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(run)
    return out


def execute_trials(
    configs: Sequence[RunConfig], store: Store, *, workload: workloads.Workload | None = None
) -> list[str]:
    """Train ``configs`` (one batch of :func:`batches`) together and record each in
    ``store`` as its own run; returns their final statuses. A trial that ends before the
    others (diverged, stopped) is finished in the store at once: a batch killed after it
    keeps its record, and only the trials still training are trained again."""
    folders = store.begin_many([(c.run_id(), c.name, c.to_dict()) for c in configs])
    ended: dict[int, str] = {}

    def finished(indices: list[int]) -> None:
        for r, status in zip(indices, store.finish_many([configs[r].run_id() for r in indices])):
            ended[r] = status

    error: ErrorInfo | None = None
    try:
        train_trials(configs, folders, workload=workload, finished=finished)
    except Exception as exc:  # recorded as failed for every trial still training, the study goes on
        error = ErrorInfo.from_exception(exc)
    rest = [r for r in range(len(configs)) if r not in ended]
    for r, status in zip(rest, store.finish_many([configs[r].run_id() for r in rest], error=error)):
        ended[r] = status
    return [ended[r] for r in range(len(configs))]


def train_trials(
    configs: Sequence[RunConfig],
    run_dirs: Sequence[Path | None],
    *,
    workload: workloads.Workload | None = None,
    finished: Callable[[list[int]], None] | None = None,
) -> list[Status]:
    """Train ``configs`` together, writing each one's record into its ``run_dirs`` entry,
    as :func:`~localsgd.run.training.train` writes one run's. A trial whose loss
    diverges is recorded as ``diverged`` and the others go on.

    The trials' files are written in group commits (:class:`~localsgd.records.group.GroupWrite`):
    their ``env.json`` at the start, and at each evaluation the statuses and final models
    of the trials that ended at it, after which ``finished`` is called with their
    indices (their records are complete on disk by then)."""
    if not configs or len(configs) != len(run_dirs):
        raise ValueError(f"one run folder per config: {len(configs)} configs, {len(run_dirs)} folders")
    dicts = [c.to_dict() for c in configs]
    keys = {batch_key(c, d) for c, d in zip(configs, dicts)}
    if None in keys or len(keys) != 1:
        raise ValueError("trials batched together must share everything but " + ", ".join(TRIAL_FIELDS))
    first = configs[0]
    device = resolve_device(first.device)
    torch.set_num_threads(first.threads)
    writers = [run_writer(c, d) for c, d in zip(configs, run_dirs)]
    statuses: list[Status | None] = [None] * len(configs)
    try:
        env = environment(1, None, device)
        group = GroupWrite()
        for writer in writers:
            writer.environment(env, group)
        group.commit()
        runs = BatchedTrials(configs, writers, device, workload, statuses, finished=finished, dicts=dicts)
        TrainingLoop(runs, Synchronous()).run()
    except BaseException as exc:
        group = GroupWrite()
        for writer, status in zip(writers, statuses):
            if status is None:
                writer.status(failed_status(ErrorInfo.from_exception(exc, 0), writer.rows), group)
        group.commit()
        raise
    finally:
        for writer in writers:
            writer.close()
    done = [s for s in statuses if s is not None]
    assert len(done) == len(configs), f"{len(configs) - len(done)} trial(s) without a status"
    return done


class BatchedTrials:
    """R trials trained together, for :class:`~localsgd.run.loop.TrainingLoop`: R records,
    each trial's own learning rate, momentum and weight decay (:class:`ReplicaSGD`); a
    trial whose loss diverges is recorded as ``diverged`` and one that crosses
    ``train.stop_at`` finishes there, as a run of its own would, while the others go on.
    No mid-run checkpoints: the trials of a batch that is interrupted are trained again,
    but for those that had ended, whose records are committed at the evaluation where they
    ended (one group commit for all of them, then ``finished`` is told their indices).
    Every trial still training is evaluated in one stacked forward
    (:meth:`~localsgd.engines.simulated.trials.TrialReplicas.evaluate_trials`).
    ``statuses``: each trial's, filled in as it finishes."""

    def __init__(
        self,
        configs: Sequence[RunConfig],
        writers: Sequence[RunWriter],
        device: torch.device,
        workload: workloads.Workload | None,
        statuses: list[Status | None],
        *,
        finished: Callable[[list[int]], None] | None = None,
        dicts: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        from localsgd.engines.simulated.trials import ReplicaSGD, SeededModels

        self.configs, self.writers, self.device, self.statuses = configs, writers, device, statuses
        self.on_finished = finished
        self.dicts = list(dicts) if dicts is not None else [c.to_dict() for c in configs]
        """Each trial's ``config.to_dict()``, for its final model's checkpoint."""
        self.group = GroupWrite()
        self.ending: list[int] = []
        """Trials that ended at this evaluation, their records in ``group``."""
        self._scores: tuple[int, dict[int, dict[str, float]], dict[int, dict[str, float]]] | None = None
        self.config = first = configs[0]
        engine = engines.get(first.engine)
        self.engine_info = engine.info
        assert isinstance(engine, engines.TrialBatching)
        self.workload = workloads.build(first.workload) if workload is None else workload
        self.plan = plan(first, self.workload)
        self.algorithm = first.algorithm_config(self.plan.steps_per_epoch)
        self.stop = stop_rule(self.workload, first)  # train.stop_at: shared by the batch (its key)
        self.held = workloads.validation_size(self.workload)
        # Each trial's model is its seed's, as a run of its own builds it; initialised
        # straight into the stacked tensors where that gives the same values.
        models = SeededModels(self.workload.make_model, [c.seed for c in configs], device)
        self.replicas = engine.trial_replicas(
            self.workload,
            models,
            workers=first.workers,
            seeds=[c.seed for c in configs],
            device=device,
            delay=first.comm.delay,
        )
        self.optimizer = ReplicaSGD(
            _param_groups(self.replicas, configs),
            momentum=self.replicas.per_replica([c.optimizer.momentum for c in configs]),
            nesterov=first.optimizer.nesterov,
        )
        self.lrs = [0.0] * len(configs)

    def begin(self, loop: TrainingLoop) -> None:
        pass

    def iterations(self) -> int:
        return self.plan.total_steps

    def batches(self, loop: TrainingLoop) -> Iterator[Any]:
        return iter(self.replicas.batches(self.config.data.batch_size, loop.epoch))

    def set_lr(self, step: int) -> None:
        run = self.plan
        self.lrs = [
            recipes.lr_at(
                step, run.total_steps, run.steps_per_epoch, c.optimizer.lr, c.schedule, run.global_batch
            )
            for c in self.configs
        ]
        self.optimizer.set_lr(self.replicas.per_replica(self.lrs))

    def optimizer_step(self, loss: torch.Tensor, dp: Any) -> torch.Tensor:
        self.optimizer.step()
        return loss

    def end_training(self) -> None:
        pass

    def train_losses(self, loop: TrainingLoop) -> dict[int, tuple[float, int]]:
        # Each trial's loss is its workers' mean already (forward_backward): trials batch
        # only runs whose workers step together (batch_key).
        total = torch.zeros(len(self.configs), device=self.device) + loop.loss_sum
        means = (total / max(loop.loss_count, 1)).double().tolist()
        return {r: (means[r], loop.loss_count) for r, s in enumerate(self.statuses) if s is None}

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Around one evaluation of every trial still training: the records of those that
        end at it are committed together after it."""
        try:
            yield
        finally:
            self._scores = None
            self.commit()

    def scores(self, loop: TrainingLoop) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
        """Every trial still training, evaluated at ``loop.step`` (on test, on validation),
        all of them at the first trial's evaluation."""
        if self._scores is None or self._scores[0] != loop.step:
            live = [r for r, s in enumerate(self.statuses) if s is None]
            test = self.replicas.evaluate_trials(live)
            validation = self.replicas.evaluate_trials(live, "validation") if self.held else {}
            self._scores = (loop.step, test, validation)
        return self._scores[1], self._scores[2]

    def evaluate(self, loop: TrainingLoop, index: int, train_loss: float | None) -> MetricsRow:
        test, validation = self.scores(loop)
        row = metrics_row(
            self.workload,
            loop.dp.stats,
            self.plan,
            step=loop.step,
            train_seconds=loop.train_seconds / len(self.configs),
            lr=self.lrs[index],
            train_loss=train_loss,
            scores=test[index],
            validation=validation.get(index, {}),
            updates=loop.dp.updates,
        )
        self.writers[index].row(row)
        log_row(row, workloads.metric(self.workload), f"trial {index} ({self.configs[index].name})")
        return row

    def diverged(self, loop: TrainingLoop, index: int, message: str) -> None:
        writer = self.writers[index]
        status = failed_status(ErrorInfo("Diverged", message, rank=0), writer.rows)
        self.statuses[index] = dataclasses.replace(status, status="diverged")
        writer.status(self.statuses[index], self.group)  # type: ignore[arg-type]
        self.ending.append(index)

    def stopped(self, loop: TrainingLoop, index: int) -> None:
        self.complete(loop, index)  # as a run of its own stops at its first crossing

    def done(self) -> bool:
        return None not in self.statuses

    def checkpoint(self, loop: TrainingLoop) -> None:
        pass

    def finish(self, loop: TrainingLoop) -> list[Status]:
        for r, status in enumerate(self.statuses):
            if status is None:
                self.complete(loop, r)
        self.commit()
        return [s for s in self.statuses if s is not None]

    def commit(self) -> None:
        """Write the records of the trials that ended since the last commit, in one group
        commit, then tell ``finished``."""
        group, ending = self.group, self.ending
        self.group, self.ending = GroupWrite(), []
        for r in ending:
            self.writers[r].close()  # its metrics rows are all written
        group.commit()
        if ending and self.on_finished is not None:
            self.on_finished(ending)

    def complete(self, loop: TrainingLoop, r: int) -> None:
        """Trial ``r`` trained to its end (or its stop): its final model and status."""
        # Each trial's wall time is its share of the batch's, as the simulated engine's is
        # one replica's share (K·share) of a run's: the cost model divides by K, never by R.
        writer, config, run = self.writers[r], self.configs[r], self.plan
        if writer.run_dir is not None:
            self.group.add(
                writer.run_dir / "checkpoint.pt",
                checkpoint_bytes(self.replicas.final_model(r), self.dicts[r], loop.step),
            )
        status = completed_status(
            self.workload,
            writer.rows,
            loop.dp.stats,
            run,
            step=loop.step,
            train_seconds=loop.train_seconds / len(self.configs),
            algorithm=self.algorithm.to_dict(),
            engine=self.engine_info,
            details={**self.replicas.details(), "batch_wall_seconds": loop.train_seconds},
            schedule=recipes.plan_warmup(
                config.schedule, run.total_steps, run.steps_per_epoch, config.optimizer.lr, run.global_batch
            ).to_dict(),
        )
        writer.status(status, self.group)
        self.statuses[r] = status
        self.ending.append(r)


def checkpoint_bytes(model: torch.nn.Module, config: dict[str, Any], step: int) -> bytes:
    """``checkpoint.pt`` as :func:`~localsgd.run.bookkeeping.save_checkpoint` writes it
    (``config``: the run's ``RunConfig.to_dict()``), for a group commit."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": config, "step": step}, buffer)
    return buffer.getvalue()


def _param_groups(replicas: Any, configs: Sequence[RunConfig]) -> list[dict[str, Any]]:
    """The parameter groups of :func:`recipes.build_optimizer`, with each trial's weight
    decay per replica."""
    params = [p for p in replicas.module.parameters() if p.requires_grad]
    decay = replicas.per_replica([c.optimizer.weight_decay for c in configs])
    if configs[0].optimizer.decay_norm_and_bias:
        return [{"params": params, "weight_decay": decay}]
    groups = [
        {"params": [p for p in params if replicas.param_ndim(p) > 1], "weight_decay": decay},
        {
            "params": [p for p in params if replicas.param_ndim(p) <= 1],
            "weight_decay": torch.zeros_like(decay),
        },
    ]
    return [g for g in groups if g["params"]]
