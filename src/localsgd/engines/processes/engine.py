"""The process engine: one worker process per worker, on torch.distributed.

A run on its own (:meth:`ProcessesEngine.execute`) starts its K > 1 workers (or K = 1 with
``train.max_restarts`` > 0) under torch's elastic launcher, ``-m localsgd.worker CONFIG
--run-dir DIR`` (:func:`~localsgd.engines.launching.launch.launch_run`); the same worker entry point
serves a hand-run ``torchrun`` and multi-node runs. An asynchronous run (the engine declares
``LOST_WORKERS``) is started by :mod:`~localsgd.engines.launching.tolerant` instead, in a
study too, and goes on without a lost worker other than rank 0. A study runs
through a :meth:`~ProcessesEngine.session`, whose worker pools stay up from one run to the
next (:mod:`localsgd.engines.launching.pool`). One worker trains in the calling process. A worker
that fails writes its own exception to ``DIR/errors/rank<r>.json``; the first one is the
run's root cause, raised as :class:`~localsgd.engines.base.WorkerFailure` instead of the
launcher's summary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from localsgd import workloads
from localsgd.comm.base import Communicator
from localsgd.engines.base import Capability, Job, Replicas, Session, no_options, register
from localsgd.engines.launching.launch import launch_run, root_error
from localsgd.engines.launching.launch import write_worker_error as write_worker_error
from localsgd.engines.launching.pool import LocalSession
from localsgd.engines.launching.tolerant import launch_tolerant
from localsgd.records.record import EngineInfo


class ProcessesEngine:
    """K worker processes (torch.distributed: gloo on CPU, NCCL on GPU), one replica each."""

    info = EngineInfo(
        "processes",
        real_wall_time=True,
        description="K worker processes on torch.distributed, one replica each",
    )
    capabilities = Capability.RESTARTS | Capability.LOST_WORKERS

    def options(self, raw: Mapping[str, Any] | None, workers: int | None = None) -> None:
        no_options(self.info.name, raw)

    def processes(self, workers: int, options: Mapping[str, Any] | None = None) -> int:
        return workers

    def execute(self, job: Job) -> None:
        if job.workers == 1 and job.max_restarts == 0:
            job.train(0, 1)
            return
        if job.tolerates_lost_workers and job.max_restarts == 0:
            # A parameter server goes on without a lost worker: a launch that does too.
            launch_tolerant(job, job.workers)
            return
        launch_run(job, job.workers)

    def session(self, *, in_process: bool = True) -> Session:
        return LocalSession(self, in_process=in_process)

    def replicas(
        self,
        workload: Any,
        model: nn.Module,
        *,
        rank: int,
        world_size: int,
        workers: int,
        device: torch.device,
        delay: Mapping[str, float] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Replicas:
        return ProcessReplica(workload, model, rank, world_size, device, delay)


class ProcessReplica:
    """This process trains one replica; rank 0 evaluates. With a ``delay``, its communicator
    waits that long after every counted collective of the scope (see
    :class:`~localsgd.comm.process_group.ProcessGroupCommunicator`)."""

    flat = True

    def __init__(
        self,
        workload: Any,
        model: nn.Module,
        rank: int,
        world_size: int,
        device: torch.device,
        delay: Mapping[str, float] | None = None,
    ) -> None:
        self.comm: Communicator | None = None  # DataParallel takes the world's process group
        if delay and world_size > 1:
            from localsgd.comm.process_group import ProcessGroupCommunicator

            self.comm = ProcessGroupCommunicator(delay=delay)
        self.workload = workload
        self.module = model
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def param_ndim(self, p: torch.Tensor) -> int:
        return p.ndim

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[Any]:
        return self.workload.train_batches(self.rank, self.world_size, batch_size, epoch, seed, self.device)

    def forward_backward(self, batch: Any) -> torch.Tensor:
        loss = self.workload.loss(self.module, batch)
        loss.backward()
        return loss.detach()

    def unscale_(self, scaler: Any, dp: Any) -> None:
        dp.unscale_(scaler)

    def mean_loss(
        self, total: torch.Tensor | float, count: int
    ) -> tuple[torch.Tensor | float, torch.Tensor | int]:
        return total / max(count, 1), count

    def worker_mean(self, value: torch.Tensor, dp: Any) -> float:
        mean = value.double().reshape(1)
        dp.comm.average([mean], record=False)
        return float(mean.item())

    def evaluate(self, split: str = "test") -> dict[str, float]:
        return workloads.evaluate(self.workload, self.module, self.device, split) if self.rank == 0 else {}

    def begin(
        self,
        optimizer: torch.optim.Optimizer,
        lr: Callable[[int], float],
        total_steps: int,
        batch_size: int,
        seed: int,
    ) -> None:
        pass

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def iterations(self, total_steps: int) -> int:
        return total_steps

    def worker_steps(self, iteration: int) -> float:
        return float(iteration)

    def updates(self, dp: Any) -> int | None:
        return int(dp.updates)

    def finish(self) -> None:
        pass

    def final_model(self) -> nn.Module:
        return self.module

    def details(self) -> dict[str, Any]:
        return {}


PROCESSES = register(ProcessesEngine())

__all__ = ["PROCESSES", "ProcessReplica", "ProcessesEngine", "root_error", "write_worker_error"]
