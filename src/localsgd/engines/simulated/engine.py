"""The simulated engine: K replicas batched in one process, with the semantics of K processes.

The replicas are stacked (:mod:`localsgd.engines.simulated.stacked`): every parameter and buffer
along a leading replica dimension, gradients of all replicas at once (fused stacked layers
or ``vmap``), one optimizer over the stacked tensors, and a communicator whose ``average``
is a mean over the replica dimension. Runs that differ only in optimizer settings train
together as trials (:mod:`localsgd.engines.simulated.trials`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from localsgd import workloads
from localsgd.comm.base import Communicator
from localsgd.engines.base import Capability, Job, Replicas, Session, register
from localsgd.engines.launching.launch import launch_run
from localsgd.engines.launching.pool import LocalSession
from localsgd.engines.simulated.asynchrony import Asynchrony, SimulatedOptions, simulated_options
from localsgd.engines.simulated.communicator import (
    ELEMENTWISE_OPTIMIZERS,
    SimulatedCommunicator,
    check_elementwise,
    replica_span,
)
from localsgd.engines.simulated.gradients import ReplicaGradients, replica_details
from localsgd.engines.simulated.stacked import LossFn, StackedModel, explicit_batchnorm, retain_freed_memory
from localsgd.engines.simulated.trials import TrialReplicas
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
    "retain_freed_memory",
]


class SimulatedEngine:
    """K replicas stacked in one process with the semantics of K worker processes."""

    info = EngineInfo(
        "simulated",
        real_wall_time=False,
        description="K replicas batched in one process (fused stacked layers, or vmap), the semantics of K worker processes",
    )
    capabilities = (
        Capability.TRIAL_BATCHING
        | Capability.WORKER_SPEEDS
        | Capability.STEPS_BY_SPEED
        | Capability.SPEEDS_BY_HOLDING_STILL
        | Capability.RESTARTS
        | Capability.OPTIONS
    )

    def options(self, raw: Mapping[str, Any] | None, workers: int | None = None) -> SimulatedOptions:
        return simulated_options(raw, workers)

    def processes(self, workers: int, options: Mapping[str, Any] | None = None) -> int:
        return 1

    def execute(self, job: Job) -> None:
        if job.max_restarts:
            launch_run(job, 1)  # torch's elastic launcher restarts the one process
            return
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
        options: Mapping[str, Any] | None = None,
    ) -> Replicas:
        return SimulatedReplicas(workload, model, workers, device, delay, self.options(options, workers))

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
        (:class:`~localsgd.engines.simulated.trials.TrialReplicas`)."""
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
        options: SimulatedOptions | None = None,
    ) -> None:
        self.delay = dict(delay or {})
        self.workload = workload
        self.replicas = replicas
        self.device = device
        self.options = options or SimulatedOptions()
        retain_freed_memory()
        self.module = StackedModel(model, replicas)
        self.gradients = ReplicaGradients(self.module, workload.loss)
        self.comm: Communicator | None = SimulatedCommunicator(replicas)
        self.asynchrony: Asynchrony | None = None
        self._loss_steps: torch.Tensor | None = None
        """Each replica's own steps since the last mean_loss, when some are held still."""
        self.speeds: list[float] = []
        self.total_steps = 0

    def param_ndim(self, p: torch.Tensor) -> int:
        return self.module.replica_ndim[id(p)]

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        check_elementwise(optimizer)
        # Registered before DataParallel's hooks, so held replicas are put back before an
        # algorithm sees the step.
        self._held: dict[str, Any] = {}
        optimizer.register_step_pre_hook(self._hold)
        optimizer.register_step_post_hook(self._release)

    def begin(
        self,
        optimizer: torch.optim.Optimizer,
        lr: Callable[[int], float],
        total_steps: int,
        batch_size: int,
        seed: int,
    ) -> None:
        comm = self.comm
        assert isinstance(comm, SimulatedCommunicator)
        speeds = self.options.speeds(self.replicas, seed)
        self.speeds = speeds
        self.total_steps = total_steps
        if comm.server is None:
            return  # no parameter server: replicas step together whatever their speeds
        server: Any = comm.server
        streams = [self._stream(k, batch_size, seed) for k in range(self.replicas)]
        totals = self.options.totals(speeds, total_steps)
        self.asynchrony = Asynchrony(server, speeds, server.options.period, totals, streams)
        comm.schedule = self.asynchrony
        if self.asynchrony.masking:
            self._loss_steps = torch.zeros(self.replicas, device=self.device)
        if self.asynchrony.masking and type(optimizer) is not torch.optim.SGD:
            raise ValueError(
                "the simulated engine holds some replicas still while others step (unequal worker "
                f"speeds, or rounds of unequal length), which is exact for SGD only, not {type(optimizer).__name__}"
            )
        if self.asynchrony.mixed_steps and any(
            lr(i) != lr(0)
            for i in range(0, self.asynchrony.iterations, max(1, self.asynchrony.iterations // 997))
        ):
            raise ValueError(
                "with unequal worker speeds the simulated engine steps replicas that are at different "
                "steps of their own at once: the learning rate must be constant (schedule.name = 'constant')"
            )

    def _stream(self, k: int, batch_size: int, seed: int) -> Iterator[Any]:
        epoch = 0
        while True:
            yield from self.workload.train_batches(k, self.replicas, batch_size, epoch, seed, self.device)
            epoch += 1

    def iterations(self, total_steps: int) -> int:
        return self.asynchrony.iterations if self.asynchrony is not None else total_steps

    def worker_steps(self, iteration: int) -> float:
        return self.asynchrony.progress[iteration] if self.asynchrony is not None else float(iteration)

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[Any]:
        if self.asynchrony is not None:
            while True:  # each replica its own stream, for as long as the schedule runs
                yield zip_nests(torch.stack, self.asynchrony.next_batches())
        streams = [(k, self.replicas, seed) for k in range(self.replicas)]
        yield from workloads.stacked_train_batches(self.workload, streams, batch_size, epoch, self.device)

    def _still(self) -> list[int]:
        """The replicas held still at this step."""
        if self.asynchrony is None or not self.asynchrony.masking:
            return []
        active = set(self.asynchrony.active())
        return [k for k in range(self.replicas) if k not in active]

    def forward_backward(self, batch: Any) -> torch.Tensor:
        still = self._still()
        buffers = self.module.stacked_buffers()
        saved = [b[still].clone() for b in buffers] if still else []
        # Each replica's own loss where one is read alone: rank 0's of an asynchronous run,
        # or replicas held still (the fused path may return only their mean otherwise).
        losses = self.gradients(batch, replica_losses=self.asynchrony is not None).flatten()
        if self._loss_steps is not None:
            # A held replica's loss (of another replica's batch) is none of its own steps.
            active = torch.ones_like(self._loss_steps)
            active[still] = 0
            self._loss_steps += active
            losses = torch.where(active.to(torch.bool), losses, torch.zeros_like(losses))
        if still:
            with torch.no_grad():
                for b, rows in zip(buffers, saved):
                    b[still] = rows
        return losses

    def _hold(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        still = self._still()
        if not still:
            self._held = {}
            return
        params = list(self.module.stacked)
        state = {
            (i, name): value[still].clone()
            for i, p in enumerate(params)
            for name, value in optimizer.state.get(p, {}).items()
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == self.replicas
        }
        self._held = {"still": still, "params": [p.detach()[still].clone() for p in params], "state": state}

    @torch.no_grad()
    def _release(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        held = self._held
        if held:
            still = held["still"]
            params = list(self.module.stacked)
            for p, rows in zip(params, held["params"]):
                p[still] = rows
            for i, p in enumerate(params):
                for name, value in optimizer.state.get(p, {}).items():
                    if (
                        isinstance(value, torch.Tensor)
                        and value.dim() > 0
                        and value.shape[0] == self.replicas
                    ):
                        # A momentum buffer born at this step is "none yet" for a held replica: 0
                        # (SGD's first step sets it to the gradient, as 0·β + gradient does).
                        rows = held["state"].get((i, name))
                        value[still] = rows if rows is not None else 0
        if self.asynchrony is not None:
            self.asynchrony.stepped()

    def unscale_(self, scaler: Any, dp: Any) -> None:
        # One scaler sees every replica's gradients: its overflow decision is shared already.
        scaler.unscale_(dp.optimizer)

    def mean_loss(
        self, total: torch.Tensor | float, count: int
    ) -> tuple[torch.Tensor | float, torch.Tensor | int]:
        if self._loss_steps is None:
            return total / max(count, 1), count
        # Held replicas' losses were left out (forward_backward): each over its own steps.
        steps, self._loss_steps = self._loss_steps, torch.zeros_like(self._loss_steps)
        return total / steps.clamp_min(1), steps

    def worker_mean(self, value: torch.Tensor, dp: Any) -> float:
        return float(value.double().mean().item())

    def evaluate(self, split: str = "test") -> dict[str, float]:
        # Called under consensus(): every replica holds the consensus model.
        model = self.module.load_replica_into_template(0)
        return workloads.evaluate(self.workload, model, self.device, split)

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def updates(self, dp: Any) -> int | None:
        return int(dp.updates)

    def finish(self) -> None:
        pass

    def final_model(self) -> nn.Module:
        return self.module.load_replica_into_template(0)

    def details(self) -> dict[str, Any]:
        out = replica_details(self.gradients, self.delay)
        if self.options.heterogeneous or self.asynchrony is not None:
            # Virtual time, in steps of a worker of speed 1: when the last worker finished
            # (asynchronous), or every step waiting for the slowest (synchronous).
            out["worker_speeds"] = self.speeds
            out["virtual_time"] = (
                self.asynchrony.virtual_time()
                if self.asynchrony is not None
                else self.total_steps / min(self.speeds)
            )
        return out


SIMULATED = register(SimulatedEngine())
