"""The simulated engine: K replicas batched in one process, with the semantics of K processes.

The replicas are stacked (:mod:`localsgd.engines.stacked`): every parameter and buffer
along a leading replica dimension, gradients of all replicas at once (fused stacked layers
or ``vmap``), one optimizer over the stacked tensors, and a communicator whose ``average``
is a mean over the replica dimension. Runs that differ only in optimizer settings train
together as trials (:mod:`localsgd.engines.trials`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from localsgd.comm.base import Communicator
from localsgd.engines.base import Job, Replicas, Session, register
from localsgd.engines.pool import LocalSession
from localsgd.engines.stacked import (
    ELEMENTWISE_OPTIMIZERS,
    LossFn,
    ReplicaGradients,
    SimulatedCommunicator,
    StackedModel,
    check_elementwise,
    explicit_batchnorm,
    replica_details,
    replica_span,
)
from localsgd.engines.trials import TrialReplicas
from localsgd.records.record import EngineInfo
from localsgd.util.nest import zip_nests

__all__ = [
    "ELEMENTWISE_OPTIMIZERS",
    "SIMULATED",
    "LossFn",
    "ReplicaGradients",
    "SimulatedCommunicator",
    "SimulatedEngine",
    "SimulatedReplicas",
    "StackedModel",
    "check_elementwise",
    "explicit_batchnorm",
    "replica_details",
    "replica_span",
]


class SimulatedEngine:
    """K replicas stacked in one process with the semantics of K worker processes."""

    info = EngineInfo(
        "simulated",
        real_wall_time=False,
        description="K replicas batched in one process (fused stacked layers, or vmap), the semantics of K worker processes",
    )

    def processes(self, workers: int) -> int:
        return 1

    def execute(self, job: Job) -> None:
        job.train(0, 1)

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
    ) -> Replicas:
        return SimulatedReplicas(workload, model, workers, device, delay)

    def trial_replicas(
        self,
        workload: Any,
        models: Sequence[nn.Module],
        *,
        workers: int,
        seeds: Sequence[int],
        device: torch.device,
        delay: Mapping[str, float] | None = None,
    ) -> Any:
        """R trials of ``workers`` replicas each in this process, one per model and seed
        (:class:`~localsgd.engines.trials.TrialReplicas`)."""
        return TrialReplicas(workload, models, workers, seeds, device, delay)


class SimulatedReplicas:
    """All K replicas stacked in this process; replica k reads exactly the shard rank k
    reads in the process engine. An injected ``delay`` is not waited out (the wall time
    here is not a K-worker time anyway): it is recorded in the run's details, and the cost
    model adds it to the estimates from the run's config."""

    flat = False

    def __init__(
        self,
        workload: Any,
        model: nn.Module,
        replicas: int,
        device: torch.device,
        delay: Mapping[str, float] | None = None,
    ) -> None:
        self.delay = dict(delay or {})
        self.workload = workload
        self.replicas = replicas
        self.device = device
        self.module = StackedModel(model, replicas)
        self.gradients = ReplicaGradients(self.module, workload.loss)
        self.comm: Communicator | None = SimulatedCommunicator(replicas)

    def param_ndim(self, p: torch.Tensor) -> int:
        return self.module.replica_ndim[id(p)]

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        check_elementwise(optimizer)

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[Any]:
        streams = [
            self.workload.train_batches(k, self.replicas, batch_size, epoch, seed, self.device)
            for k in range(self.replicas)
        ]
        for group in zip(*streams):
            yield zip_nests(torch.stack, list(group))

    def forward_backward(self, batch: Any) -> torch.Tensor:
        return self.gradients(batch).flatten()

    def unscale_(self, scaler: Any, dp: Any) -> None:
        # One scaler sees every replica's gradients: its overflow decision is shared already.
        scaler.unscale_(dp.optimizer)

    def worker_mean(self, value: torch.Tensor, dp: Any) -> float:
        return float(value.double().mean().item())

    def evaluate(self) -> dict[str, float]:
        # Called under consensus(): every replica holds the consensus model.
        return self.workload.evaluate(self.module.load_replica_into_template(0), self.device)

    def final_model(self) -> nn.Module:
        return self.module.load_replica_into_template(0)

    def details(self) -> dict[str, Any]:
        return replica_details(self.gradients, self.delay)


SIMULATED = register(SimulatedEngine())
