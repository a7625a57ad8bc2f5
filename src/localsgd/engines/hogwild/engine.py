"""The Hogwild engine: P processes per device share one model and update it without locks
(Niu et al. 2011, "Hogwild!"; PyTorch's ``mnist_hogwild`` example).

Each device has a *leader*, a torch.distributed rank that runs the shared training loop
(``localsgd.run.training``) and the run's algorithm across devices (over the D leaders;
a world of one on one device). When training starts the leader puts its model in shared
memory (``share_memory()``; on CUDA the model stays on the device and reaches the other
processes through CUDA IPC, which ``torch.multiprocessing`` uses for CUDA tensors) and
spawns P − 1 *helper* processes with ``torch.multiprocessing``. Every process of a device
has its own data shard (worker w = d·P + j of W = D·P), its own gradients and its own
optimizer state (same optimizer class and settings), and writes the shared parameters in
place whenever it steps: no locks, no copies. The learning-rate schedule follows the
device's progress, its processes' steps together / P, so that a process the OS runs ahead
of the others does not run through the schedule on its own.

Evaluation: the leader holds the helpers at their next step boundary, evaluates the shared
model, and lets them go on; the final evaluation waits until every helper has finished.
Updates are every process's optimizer steps on the shared model (counted in shared memory).
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from localsgd import workloads
from localsgd.comm.base import Communicator
from localsgd.engines.base import Capability, Job, Replicas, Session, register
from localsgd.engines.launching.launch import launch_run
from localsgd.engines.launching.pool import LocalSession
from localsgd.records.record import EngineInfo
from localsgd.util.checks import ConfigError, check_int, from_dict

log = logging.getLogger(__name__)

HOLD_POLL = 0.5
"""Seconds between checks that the helpers are alive while the leader waits for them."""


@dataclass(frozen=True)
class HogwildOptions:
    """``[engine_options]`` of a Hogwild run: workers = ``devices`` × ``procs_per_device``."""

    procs_per_device: int = 1
    """P: processes sharing each device's model."""
    devices: int = 1
    """D: devices (one leader process each); their models are combined by the run's
    algorithm over the D leaders. On CPU each "device" is a model in shared memory."""

    def __post_init__(self) -> None:
        check_int("engine_options.procs_per_device", self.procs_per_device, 1, 1024)
        check_int("engine_options.devices", self.devices, 1, 1024)

    def requests(self) -> dict[Capability, str]:
        return {}


class HogwildEngine:
    """P lock-free processes per device on one shared model; see the module docstring."""

    info = EngineInfo(
        "hogwild",
        real_wall_time=True,
        description=(
            "P processes per device update one shared model without locks (Hogwild); wall time is "
            "the leader's training time, the helpers training at the same time; updates count every "
            "process's steps"
        ),
    )
    # The helpers step on their own, without the workers' agreement on fp16 overflows
    # (Replicas.unscale_) and without a step every process reaches together: no mid-run
    # checkpoint to restart from.
    capabilities = Capability.OPTIONS | Capability.STEPS_WITHOUT_AGREEMENT

    def options(self, raw: Mapping[str, Any] | None, workers: int | None = None) -> HogwildOptions:
        options = from_dict(HogwildOptions, dict(raw or {}), "engine_options")
        if workers is not None and workers != options.devices * options.procs_per_device:
            raise ConfigError(
                f"engine = 'hogwild' runs workers = engine_options.devices × engine_options.procs_per_device "
                f"processes; got workers = {workers} with devices = {options.devices} and "
                f"procs_per_device = {options.procs_per_device}"
            )
        return options

    def processes(self, workers: int, options: Mapping[str, Any] | None = None) -> int:
        return self.options(options).devices

    def execute(self, job: Job) -> None:
        processes = self.processes(job.workers, job.engine_options)
        if processes == 1 and job.max_restarts == 0:
            job.train(0, 1)
            return
        launch_run(job, processes)

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
        return HogwildReplicas(workload, model, rank, self.options(options, workers), device, delay)


class Control:
    """What the leader and its helpers share: a hold flag for evaluations, how many helpers
    are holding (or done), every helper's steps, and a helper's error."""

    def __init__(self, context: Any, helpers: int) -> None:
        self.helpers = helpers
        self.cond = context.Condition()
        self.hold_flag = context.Value("i", 0, lock=False)
        self.holding = context.Value("i", 0, lock=False)
        self.ready = context.Value("i", 0, lock=False)
        self.steps = torch.zeros(helpers + 1, dtype=torch.int64).share_memory_()
        """Every process's steps: the leader's in slot 0, helper j's in slot j."""
        self.errors = context.SimpleQueue()

    # -- a helper's side ---------------------------------------------------------------------

    def arrive(self) -> None:
        """Set up and about to take its first step."""
        with self.cond:
            self.ready.value += 1
            self.cond.notify_all()

    def step_boundary(self) -> None:
        if self.hold_flag.value:
            with self.cond:
                self.holding.value += 1
                self.cond.notify_all()
                self.cond.wait_for(lambda: self.hold_flag.value == 0)
                self.holding.value -= 1

    def progress(self) -> int:
        """The device's steps per process so far: every process's steps (slot 0 the
        leader's) over P."""
        return int(self.steps.sum()) // (self.helpers + 1)

    def leave(self) -> None:
        with self.cond:
            self.holding.value += 1  # a finished helper holds for good
            self.cond.notify_all()


def _helper(
    worker: int,
    workers: int,
    slot: int,
    model: nn.Module,
    workload: Any,
    optimizer_class: type[torch.optim.Optimizer],
    groups: list[tuple[list[int], dict[str, Any]]],
    lr: Callable[[int], float],
    total_steps: int,
    batch_size: int,
    seed: int,
    device: str,
    threads: int,
    control: Control,
) -> None:
    """A helper process: train ``total_steps`` steps of shard ``worker`` on the shared model."""
    try:
        torch.set_num_threads(threads)
        where = torch.device(device)
        if where.type == "cuda":
            torch.cuda.set_device(where)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = optimizer_class(
            [{**settings, "params": [params[i] for i in idx]} for idx, settings in groups]
        )  # type: ignore[call-arg]
        step, epoch = 0, 0
        control.arrive()
        while step < total_steps:
            for batch in workload.train_batches(worker, workers, batch_size, epoch, seed, where):
                control.step_boundary()
                for group in optimizer.param_groups:
                    group["lr"] = lr(control.progress())
                optimizer.zero_grad(set_to_none=True)
                workload.loss(model, batch).backward()
                optimizer.step()
                step += 1
                control.steps[slot] = step
                if step >= total_steps:
                    break
            epoch += 1
    except BaseException as exc:
        trace = "".join(traceback.format_exception(exc)).strip()
        control.errors.put(f"hogwild worker {worker} failed: {type(exc).__name__}: {exc}\n{trace}")
        raise
    finally:
        control.leave()


class HogwildReplicas:
    """This device's leader: its own shard, the shared model, the helpers it spawns."""

    flat = False  # the parameters stay where they are: shared memory is shared in place

    def __init__(
        self,
        workload: Any,
        model: nn.Module,
        rank: int,
        options: HogwildOptions,
        device: torch.device,
        delay: Mapping[str, float] | None = None,
    ) -> None:
        self.comm: Communicator | None = None  # DataParallel takes the leaders' process group
        if delay and options.devices > 1:
            from localsgd.comm.process_group import ProcessGroupCommunicator

            self.comm = ProcessGroupCommunicator(delay=delay)
        self.workload = workload
        self.module = model
        self.options = options
        self.device = device
        self.procs = options.procs_per_device
        self.workers = options.devices * options.procs_per_device
        self.worker = rank * self.procs  # this leader's shard
        self.rank = rank
        self.steps = 0
        self.helpers: list[Any] = []
        self.control: Control | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr: Callable[[int], float] | None = None

    def param_ndim(self, p: torch.Tensor) -> int:
        return p.ndim

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def begin(
        self,
        optimizer: torch.optim.Optimizer,
        lr: Callable[[int], float],
        total_steps: int,
        batch_size: int,
        seed: int,
    ) -> None:
        """Share the model and start the P − 1 helpers (after ``DataParallel`` entered, so
        they start from the leaders' common model)."""
        if self.procs == 1:
            return
        self.optimizer, self.lr = optimizer, lr
        import torch.multiprocessing as mp

        if self.device.type == "cpu":
            self.module.share_memory()
        context = mp.get_context("spawn")  # CUDA cannot be forked; spawn is safe everywhere
        self.control = control = Control(context, self.procs - 1)
        index = {id(p): i for i, p in enumerate(p for p in self.module.parameters() if p.requires_grad)}
        groups = [
            ([index[id(p)] for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
            for g in optimizer.param_groups
        ]
        for j in range(1, self.procs):
            process = context.Process(
                target=_helper,
                args=(
                    self.worker + j,
                    self.workers,
                    j,
                    self.module,
                    self.workload,
                    type(optimizer),
                    groups,
                    lr,
                    total_steps,
                    batch_size,
                    seed,
                    str(self.device),
                    torch.get_num_threads(),
                    self.control,
                ),
                name=f"hogwild-{self.worker + j}",
                daemon=True,
            )
            process.start()
            self.helpers.append(process)
        # Training (and its wall time) starts when every helper is ready to step: starting a
        # Python process is not training.
        self._wait(lambda: control.ready.value >= control.helpers)

    def _wait(self, condition: Callable[[], bool]) -> None:
        """Wait on the shared condition, checking meanwhile that no helper failed."""
        control = self.control
        assert control is not None
        with control.cond:
            while not control.cond.wait_for(condition, HOLD_POLL):
                self._check_helpers()

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[Any]:
        return self.workload.train_batches(self.worker, self.workers, batch_size, epoch, seed, self.device)

    def forward_backward(self, batch: Any) -> torch.Tensor:
        if self.control is not None and self.optimizer is not None and self.lr is not None:
            # The schedule at the device's progress, as the helpers take it (module docstring).
            rate = self.lr(self.control.progress())
            for group in self.optimizer.param_groups:
                group["lr"] = rate
        loss = self.workload.loss(self.module, batch)
        loss.backward()
        self.steps += 1
        if self.control is not None:
            self.control.steps[0] = self.steps
        return loss.detach()

    def unscale_(self, scaler: Any, dp: Any) -> None:
        # Unreachable from a checked run config (Capability.STEPS_WITHOUT_AGREEMENT).
        raise RuntimeError("the hogwild engine does not train in fp16: its helpers step without a GradScaler")

    def mean_loss(
        self, total: torch.Tensor | float, count: int
    ) -> tuple[torch.Tensor | float, torch.Tensor | int]:
        return total / max(count, 1), count

    def worker_mean(self, value: torch.Tensor, dp: Any) -> float:
        mean = value.double().reshape(1)
        dp.comm.average([mean], record=False)
        return float(mean.item())

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Hold the helpers at their next step boundary while the model is evaluated (and
        the consensus put in place and taken back), so that nothing they write is undone."""
        control = self.control
        if control is None:
            yield
            return
        control.hold_flag.value = 1
        self._wait(lambda: control.holding.value >= control.helpers)
        try:
            yield
        finally:
            with control.cond:
                control.hold_flag.value = 0
                control.cond.notify_all()

    def _check_helpers(self) -> None:
        assert self.control is not None
        failed = [p for p in self.helpers if p.exitcode not in (None, 0)]
        if failed:
            message = self.control.errors.get() if not self.control.errors.empty() else ""
            raise RuntimeError(
                message or f"hogwild helper {failed[0].name} exited with code {failed[0].exitcode}"
            )

    def evaluate(self, split: str = "test") -> dict[str, float]:
        return workloads.evaluate(self.workload, self.module, self.device, split) if self.rank == 0 else {}

    def iterations(self, total_steps: int) -> int:
        return total_steps

    def worker_steps(self, iteration: int) -> float:
        return float(iteration)

    def updates(self, dp: Any) -> int | None:
        """Every process's steps on this device's model; None with several devices (each
        leader counts its own device's only)."""
        if self.options.devices > 1:
            return None
        return int(self.control.steps.sum()) if self.control is not None else self.steps

    def finish(self) -> None:
        """Wait for the helpers to finish their steps (before the final evaluation). Their
        processes exit afterwards (:meth:`details` reaps them): a process's exit is no part
        of training, and on a busy machine it takes seconds."""
        control = self.control
        if control is not None:
            self._wait(lambda: control.holding.value >= control.helpers)  # all have left
            self._check_helpers()

    def _reap(self) -> None:
        for process in self.helpers:
            while process.is_alive():
                process.join(HOLD_POLL)
        if self.control is not None:
            self._check_helpers()

    def final_model(self) -> nn.Module:
        return self.module

    def details(self) -> dict[str, Any]:
        self._reap()  # called once, when the run is over
        return {
            "procs_per_device": self.procs,
            "devices": self.options.devices,
            "updates": self.updates(None),
        }


HOGWILD = register(HogwildEngine())

__all__ = ["HOGWILD", "HogwildEngine", "HogwildOptions", "HogwildReplicas"]
