"""The training loop: one loop for single, resumed, batched-trial and asynchronous runs.

:class:`TrainingLoop` holds where training stands (step, epoch, batch of the epoch,
training seconds, the loss summed since the last evaluation) and names its stages:
:meth:`~TrainingLoop.train_step` (learning rate, gradients, the optimizer's step, in which
``DataParallel``'s hooks synchronise), :meth:`~TrainingLoop.evaluate`,
:meth:`~TrainingLoop.check_divergence`, :meth:`~TrainingLoop.should_stop`,
:meth:`~TrainingLoop.checkpoint`. What differs between runs is handed to it:

- :class:`Runs`, what is trained and recorded: one run
  (:class:`~localsgd.run.training.SingleRun`: checkpoints, resumes, ends on divergence or
  a stop crossing) or R trials batched in one process
  (:class:`~localsgd.run.trials.BatchedTrials`: a trial ends alone, the others go on);
- :class:`Evaluation`, when the model is evaluated and whose loss is recorded:
  :class:`Synchronous` (every rank, the consensus, the workers' mean loss) or
  :class:`Asynchronous` (workers that never wait for one another: rank 0 alone, its own
  loss, the final evaluation once every worker has finished).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from localsgd.data_parallel import DataParallel
from localsgd.records.record import MetricsRow, Status
from localsgd.run.bookkeeping import StopRule
from localsgd.run.config import RunConfig

log = logging.getLogger(__name__)


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class Runs(Protocol):
    """What a :class:`TrainingLoop` trains and records: one run, or several trained together.
    Each run it records has an index (0 for a single run); the loop asks about the runs
    still training and tells what happened to each."""

    @property
    def config(self) -> RunConfig:
        """What every run here shares: ``train.eval_every``, ``train.stop_at``."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def replicas(self) -> Any:
        """The replicas the loop steps: ``module``, ``comm``, ``flat``, ``forward_backward``."""
        ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def algorithm(self) -> Any:
        """The algorithm ``DataParallel`` runs."""
        ...

    @property
    def stop(self) -> StopRule | None:
        """``train.stop_at``, shared by every run here."""
        ...

    def begin(self, loop: TrainingLoop) -> None:
        """``DataParallel`` has entered: restore a checkpoint, start the engine's own workers."""
        ...

    def iterations(self) -> int:
        """Steps of the loop that train every run to its end."""
        ...

    def batches(self, loop: TrainingLoop) -> Iterator[Any]:
        """The batches of epoch ``loop.epoch`` from batch ``loop.batch`` on."""
        ...

    def set_lr(self, step: int) -> None:
        """Every run's learning rate at ``step``."""
        ...

    def optimizer_step(self, loss: torch.Tensor, dp: DataParallel) -> torch.Tensor:
        """Step the optimizer (and a loss scaler); returns the loss unscaled."""
        ...

    def end_training(self) -> None:
        """The last step is taken: workers the engine started itself finish."""
        ...

    def train_losses(self, loop: TrainingLoop) -> dict[int, tuple[float, int]]:
        """Each run still training: its mean train loss since the last evaluation, and the
        steps that mean is over (0: none, the row has no train loss)."""
        ...

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        """Around putting the consensus in place and evaluating it."""
        ...

    def evaluate(self, loop: TrainingLoop, index: int, train_loss: float | None) -> MetricsRow:
        """Evaluate run ``index``'s model in place; write and log its metrics row."""
        ...

    def diverged(self, loop: TrainingLoop, index: int, message: str) -> None:
        """Run ``index``'s train loss is not finite."""
        ...

    def stopped(self, loop: TrainingLoop, index: int) -> None:
        """Run ``index`` crossed ``train.stop_at``."""
        ...

    def done(self) -> bool:
        """No run is training any more."""
        ...

    def checkpoint(self, loop: TrainingLoop) -> None:
        """A step is over (``loop.synced``: the algorithm synchronised at it): save a
        checkpoint if one is due."""
        ...

    def finish(self, loop: TrainingLoop) -> list[Status]:
        """Training is over: every run's status, in order (written for those that had none)."""
        ...


class Evaluation(Protocol):
    """When a :class:`TrainingLoop` evaluates, on which ranks, and whose train loss it records."""

    evaluates: bool
    """Whether this rank evaluates and writes rows."""

    def due(self, loop: TrainingLoop) -> bool:
        """Whether to evaluate after the step just taken."""
        ...

    def train_loss(self, replicas: Any, loop: TrainingLoop, mean: Any, steps: Any) -> tuple[float, int]:
        """The train loss to record from each worker's ``mean`` over its own ``steps``
        (``replicas.mean_loss``), and the steps it is over."""
        ...

    def finish(self, loop: TrainingLoop, waited: float) -> None:
        """``DataParallel`` has been left, which took ``waited`` seconds."""
        ...


class Synchronous:
    """Workers that step together: every rank evaluates the consensus model every
    ``train.eval_every`` steps and after the last, and records the workers' mean loss."""

    evaluates = True

    def due(self, loop: TrainingLoop) -> bool:
        return loop.step % loop.eval_every == 0 or loop.step == loop.iterations

    def train_loss(self, replicas: Any, loop: TrainingLoop, mean: Any, steps: Any) -> tuple[float, int]:
        return replicas.worker_mean(torch.as_tensor(mean, dtype=torch.float64), loop.dp), loop.loss_count

    def finish(self, loop: TrainingLoop, waited: float) -> None:
        pass


class Asynchronous:
    """Workers that never wait for one another (a parameter server): only rank 0 evaluates
    (the global model, without any collective) and records its own replica's loss (a mean
    over workers would be a collective). Its final evaluation comes once, after leaving
    ``DataParallel``, when every worker has finished; that wait is training time."""

    def __init__(self, rank: int) -> None:
        self.evaluates = rank == 0

    def due(self, loop: TrainingLoop) -> bool:
        # None once no worker has a step left (after the last step, or in a simulated
        # schedule's last steps, which hold every replica still): the final evaluation,
        # once every worker has finished, says what the model became.
        replicas = loop.runs.replicas
        steps_left = replicas.worker_steps(loop.step) < replicas.worker_steps(loop.iterations)
        return loop.step % loop.eval_every == 0 and steps_left

    def train_loss(self, replicas: Any, loop: TrainingLoop, mean: Any, steps: Any) -> tuple[float, int]:
        return float(torch.as_tensor(mean).reshape(-1)[0]), int(torch.as_tensor(steps).reshape(-1)[0])

    def finish(self, loop: TrainingLoop, waited: float) -> None:
        loop.train_seconds += waited
        loop.evaluate(final=True)


class TrainingLoop:
    """Trains ``runs`` on this rank, evaluating as ``evaluation`` says (see the module
    docstring). Its attributes are where training stands, which a checkpoint saves
    (:meth:`position`) and a resumed run restores (:meth:`restore`)."""

    def __init__(self, runs: Runs, evaluation: Evaluation) -> None:
        self.runs = runs
        self.evaluation = evaluation
        self.eval_every = runs.config.train.eval_every
        self.device = runs.device
        self.step = 0
        self.epoch = 0
        self.batch = 0
        """Batches of this epoch consumed."""
        self.train_seconds = 0.0
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_count = 0
        """Steps whose losses ``loss_sum`` holds: those since the last evaluation."""
        self.resumed: tuple[int, ...] = ()
        """The steps of the checkpoints this run resumed from."""
        self.synced = False
        """Whether the algorithm synchronised at the step just taken."""
        self.iterations = 0
        self.dp: DataParallel

    def run(self) -> list[Status]:
        """Train to the end (or until every run stopped); returns every run's status."""
        runs = self.runs
        replicas = runs.replicas
        with DataParallel(
            replicas.module, runs.optimizer, runs.algorithm, comm=replicas.comm, flat=replicas.flat
        ) as dp:
            self.dp = dp
            runs.begin(self)
            self.iterations = runs.iterations()
            while not self.should_stop():
                self.train_epoch()
            leaving = time.perf_counter()
            # Leaving puts the consensus model on every rank (an asynchronous run's once
            # every worker has finished).
        self.evaluation.finish(self, time.perf_counter() - leaving)
        return runs.finish(self)

    def train_epoch(self) -> None:
        """The rest of epoch ``epoch``: step, evaluate when due, stop, checkpoint."""
        batches = self.runs.batches(self)
        while True:
            start = time.perf_counter()  # data loading and augmentation count as training
            data = next(batches, None)
            if data is None:
                break
            self.train_step(data)
            self.train_seconds += time.perf_counter() - start
            if self.step == self.iterations:
                self.end_training()
            if self.evaluation.due(self):
                self.evaluate()
            if self.should_stop():
                return
            self.checkpoint()
        self.epoch, self.batch = self.epoch + 1, 0

    def train_step(self, data: Any) -> None:
        """One step of every replica on ``data``: this step's learning rate, the gradients,
        the optimizer's step (in which ``DataParallel``'s hooks synchronise the replicas
        when the algorithm says so)."""
        runs = self.runs
        runs.set_lr(self.step)
        runs.optimizer.zero_grad()
        loss = runs.replicas.forward_backward(data)
        syncs = self.dp.stats["syncs"]
        loss = runs.optimizer_step(loss, self.dp)
        self.synced = self.dp.stats["syncs"] > syncs
        self.loss_sum = self.loss_sum + loss
        self.loss_count += 1
        self.step += 1
        self.batch += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def end_training(self) -> None:
        """After the last step: workers the engine started itself (Hogwild's helpers)
        finish, which is training time."""
        joining = time.perf_counter()
        self.runs.end_training()
        self.train_seconds += time.perf_counter() - joining

    def evaluate(self, *, final: bool = False) -> None:
        """A metrics row for every run still training: its mean train loss since the last
        evaluation and the metrics of the consensus model (``final``: of the model in place,
        after ``DataParallel`` was left). Then each run's divergence and stop are checked."""
        losses = self.runs.train_losses(self)
        self.loss_sum, self.loss_count = 0.0, 0
        if not self.evaluation.evaluates:
            return
        with self.model_in_place(final):
            for index, (loss, counted) in losses.items():
                row = self.runs.evaluate(self, index, loss if counted else None)
                if not self.check_divergence(index, loss):
                    self.check_stop(index, row)

    @contextlib.contextmanager
    def model_in_place(self, final: bool) -> Iterator[None]:
        """The consensus model in place of each replica, for evaluation (collective); after
        training (``final``) it is there already."""
        if final:
            yield
            return
        with self.runs.evaluating(), self.dp.consensus():
            yield

    def check_divergence(self, index: int, loss: float) -> bool:
        """Whether run ``index``'s train loss diverged (then it is told so)."""
        if math.isfinite(loss):
            return False
        # Every rank sees the same averaged loss, so all ranks learn it together.
        self.runs.diverged(self, index, f"train loss is {loss} at step {self.step}")
        return True

    def check_stop(self, index: int, row: MetricsRow) -> None:
        """Tell run ``index`` when its row crossed ``train.stop_at`` (the consensus model's
        metrics are the same on every rank: all ranks stop together)."""
        stop = self.runs.stop
        if stop is not None and stop.crossed(row):
            self.runs.stopped(self, index)

    def should_stop(self) -> bool:
        return self.step >= self.iterations or self.runs.done()

    def checkpoint(self) -> None:
        self.runs.checkpoint(self)

    def position(self) -> dict[str, Any]:
        """Where training stands, for a checkpoint."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "train_seconds": self.train_seconds,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "resumed": self.resumed,
        }

    def restore(self, position: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`position`."""
        self.step, self.epoch, self.batch = (
            int(position["step"]),
            int(position["epoch"]),
            int(position["batch"]),
        )
        self.train_seconds = position["train_seconds"]
        self.loss_sum, self.loss_count = position["loss_sum"], position["loss_count"]
        self.resumed = (*position["resumed"], self.step)


def log_row(row: MetricsRow, primary: Any, who: str) -> None:
    """A metrics row in the log: its train loss and ``primary`` metric, ``who`` wrote it."""
    log.info(
        "%s step %d epoch %.2f: train loss %.4f, %s %s",
        who,
        row.step,
        row.epoch,
        row.train_loss if row.train_loss is not None else math.nan,
        primary.title,
        primary.show(row.metrics.get(primary.name)),
    )
