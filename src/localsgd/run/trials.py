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

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from localsgd import engines, workloads
from localsgd.distributed import resolve_device
from localsgd.records.record import ErrorInfo, RunWriter, Status, failed_status
from localsgd.records.store import Store
from localsgd.run import recipes
from localsgd.run.config import RunConfig
from localsgd.run.training import (
    completed_status,
    environment,
    log_row,
    metrics_row,
    plan,
    save_checkpoint,
    stop_rule,
)

TRIAL_FIELDS = ("name", "seed", "optimizer.lr", "optimizer.momentum", "optimizer.weight_decay", "schedule")
"""What runs batched together may differ in (``schedule``: the whole section, so a new
kind of schedule batches too: each trial's rate comes from :func:`recipes.lr_at`)."""

DEFAULT_BATCH = 64
"""Trials per batch unless a study says otherwise (``--batch-trials``)."""


def batch_key(config: RunConfig) -> str | None:
    """What a run must share with the others of its batch (its config without
    :data:`TRIAL_FIELDS`), or None when it cannot be batched: its engine does not declare
    ``TRIAL_BATCHING``, its optimizer is not SGD, it trains in reduced precision, it has
    engine options (worker speeds) or its algorithm declares itself asynchronous. An
    algorithm that declares it reads the inner learning rate (``reads_inner_lr``) keeps
    ``optimizer.lr`` and ``schedule`` in the key."""
    if engines.Capability.TRIAL_BATCHING not in engines.get(config.engine).capabilities:
        return None
    if config.optimizer.name != "sgd" or config.train.precision != "fp32":
        return None
    declared = config.algorithm_config(steps_per_epoch=1).capabilities
    if config.engine_options or declared.asynchronous:
        # Worker speeds and a parameter server's schedule belong to one world of replicas;
        # trials are several worlds stepped together.
        return None
    data = config.to_dict()
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
    ``store`` as its own run; returns their final statuses."""
    folders = [store.begin(c.run_id(), c.name, c.to_dict()) for c in configs]
    error: ErrorInfo | None = None
    try:
        train_trials(configs, folders, workload=workload)
    except Exception as exc:  # recorded as failed for every trial, the study goes on
        error = ErrorInfo.from_exception(exc)
    return [store.finish(c.run_id(), error=error) for c in configs]


def train_trials(
    configs: Sequence[RunConfig],
    run_dirs: Sequence[Path | None],
    *,
    workload: workloads.Workload | None = None,
) -> list[Status]:
    """Train ``configs`` together, writing each one's record into its ``run_dirs`` entry,
    as :func:`~localsgd.run.training.train` writes one run's. A trial whose loss
    diverges is recorded as ``diverged`` and the others go on."""
    if not configs or len(configs) != len(run_dirs):
        raise ValueError(f"one run folder per config: {len(configs)} configs, {len(run_dirs)} folders")
    keys = {batch_key(c) for c in configs}
    if None in keys or len(keys) != 1:
        raise ValueError("trials batched together must share everything but " + ", ".join(TRIAL_FIELDS))
    first = configs[0]
    device = resolve_device(first.device)
    torch.set_num_threads(first.threads)
    writers = [RunWriter(d) for d in run_dirs]
    statuses: list[Status | None] = [None] * len(configs)
    try:
        env = environment(1, None, device)
        for writer in writers:
            writer.environment(env)
        _train(configs, writers, device, workload, statuses)
    except BaseException as exc:
        for writer, status in zip(writers, statuses):
            if status is None:
                writer.status(failed_status(ErrorInfo.from_exception(exc, 0), writer.rows))
        raise
    finally:
        for writer in writers:
            writer.close()
    done = [s for s in statuses if s is not None]
    assert len(done) == len(configs), f"{len(configs) - len(done)} trial(s) without a status"
    return done


def _train(
    configs: Sequence[RunConfig],
    writers: Sequence[RunWriter],
    device: torch.device,
    workload: workloads.Workload | None,
    statuses: list[Status | None],
) -> None:
    import localsgd
    from localsgd.engines.simulated.trials import ReplicaSGD

    first = configs[0]
    engine = engines.get(first.engine)
    assert isinstance(engine, engines.TrialBatching)
    if workload is None:
        workload = workloads.build(first.workload)
    primary = workloads.metric(workload)
    run = plan(first, workload)
    algorithm = first.algorithm_config(run.steps_per_epoch)
    stop = stop_rule(workload, first)  # train.stop_at: shared by the batch (its key)
    held = workloads.validation_size(workload)
    models = []
    for c in configs:
        torch.manual_seed(c.seed)  # as a run of its own: the model of its seed
        models.append(workload.make_model(c.seed).to(device))
    replicas = engine.trial_replicas(
        workload,
        models,
        workers=first.workers,
        seeds=[c.seed for c in configs],
        device=device,
        delay=first.comm.delay,
    )
    optimizer = ReplicaSGD(
        _param_groups(replicas, configs),
        momentum=replicas.per_replica([c.optimizer.momentum for c in configs]),
        nesterov=first.optimizer.nesterov,
    )
    batch = first.data.batch_size
    lrs = [0.0] * len(configs)
    step = 0
    train_seconds = 0.0
    loss_sum = torch.zeros(len(configs), device=device)
    loss_count = 0
    with localsgd.DataParallel(replicas.module, optimizer, algorithm, comm=replicas.comm, flat=False) as dp:

        def finish(r: int) -> None:
            # Each trial's wall time is its share of the batch's, as the simulated engine's
            # is one replica's share (K·share) of a run's: the cost model divides by K, never
            # by R.
            details = {**replicas.details(), "batch_wall_seconds": train_seconds}
            writer = writers[r]
            if writer.run_dir is not None:
                save_checkpoint(writer.run_dir, replicas.final_model(r), configs[r], step)
            status = completed_status(
                workload,
                writer.rows,
                dp.stats,
                run,
                step=step,
                train_seconds=train_seconds / len(configs),
                algorithm=algorithm.to_dict(),
                engine=engine.info,
                details=details,
                schedule=recipes.plan_warmup(
                    configs[r].schedule,
                    run.total_steps,
                    run.steps_per_epoch,
                    configs[r].optimizer.lr,
                    run.global_batch,
                ).to_dict(),
            )
            writer.status(status)
            statuses[r] = status

        def evaluate() -> None:
            nonlocal loss_sum, loss_count
            means = (loss_sum / max(loss_count, 1)).double().tolist()
            counted = loss_count
            loss_sum, loss_count = torch.zeros_like(loss_sum), 0
            with dp.consensus():
                for r, writer in enumerate(writers):
                    if statuses[r] is not None:
                        continue
                    row = metrics_row(
                        workload,
                        dp.stats,
                        run,
                        step=step,
                        train_seconds=train_seconds / len(configs),
                        lr=lrs[r],
                        train_loss=means[r] if counted else None,
                        scores=replicas.evaluate(r),
                        validation=replicas.evaluate(r, "validation") if held else {},
                    )
                    writer.row(row)
                    log_row(row, primary, f"trial {r} ({configs[r].name})")
                    if not math.isfinite(means[r]):
                        error = ErrorInfo("Diverged", f"train loss is {means[r]} at step {step}", rank=0)
                        status = dataclasses.replace(failed_status(error, writer.rows), status="diverged")
                        writer.status(status)
                        statuses[r] = status
                    elif stop is not None and stop.crossed(row):
                        finish(r)  # as a run of its own stops at its first crossing

        epoch = 0
        while step < run.total_steps and None in statuses:
            stream = iter(replicas.batches(batch, epoch))
            while True:
                start = time.perf_counter()
                data = next(stream, None)
                if data is None:
                    break
                lrs = [
                    recipes.lr_at(
                        step,
                        run.total_steps,
                        run.steps_per_epoch,
                        c.optimizer.lr,
                        c.schedule,
                        run.global_batch,
                    )
                    for c in configs
                ]
                optimizer.set_lr(replicas.per_replica(lrs))
                optimizer.zero_grad()
                loss_sum = loss_sum + replicas.forward_backward(data)
                optimizer.step()
                loss_count += 1
                step += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_seconds += time.perf_counter() - start
                if step % first.train.eval_every == 0 or step == run.total_steps:
                    evaluate()
                if step >= run.total_steps or None not in statuses:
                    break
            epoch += 1
    for r in range(len(configs)):
        if statuses[r] is None:
            finish(r)


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
