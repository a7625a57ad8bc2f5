"""The process engine: one worker process per worker, on torch.distributed.

K > 1 workers are started with ``python -m torch.distributed.run --nproc-per-node K -m
localsgd.worker CONFIG --run-dir DIR``; the same worker entry point serves a hand-run
``torchrun`` and multi-node runs. One worker trains in the calling process. A worker that
fails writes its own exception to ``DIR/errors/rank<r>.json``; the first one is the run's
root cause, raised as :class:`~localsgd.engines.base.WorkerFailure` instead of the
launcher's summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from localsgd.comm.base import Communicator
from localsgd.engines.base import Job, Replicas, WorkerFailure, register
from localsgd.records.record import EngineInfo, ErrorInfo, RecordError, from_json, read_json
from localsgd.util.files import write_json_atomic

ERRORS = "errors"


def write_worker_error(run_dir: str | Path, rank: int, exc: BaseException) -> None:
    """Record worker ``rank``'s exception in the run folder (every rank may do this)."""
    folder = Path(run_dir) / ERRORS
    folder.mkdir(exist_ok=True)
    info = ErrorInfo.from_exception(exc, rank)
    write_json_atomic(folder / f"rank{rank}.json", {"time": time.time(), **info.__dict__})


def root_error(run_dir: Path) -> ErrorInfo | None:
    """The first error a worker recorded (by time), or None."""
    found: list[tuple[float, ErrorInfo]] = []
    for path in sorted((run_dir / ERRORS).glob("rank*.json")):
        try:
            data = read_json(path)
            when = float(data.pop("time"))
            found.append((when, from_json(ErrorInfo, data, str(path), versioned=False)))
        except (RecordError, KeyError, TypeError, ValueError, AttributeError):
            continue
    return min(found, key=lambda f: f[0])[1] if found else None


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class ProcessesEngine:
    """K worker processes (torch.distributed: gloo on CPU, NCCL on GPU), one replica each."""

    info = EngineInfo(
        "processes",
        real_wall_time=True,
        description="K worker processes on torch.distributed, one replica each",
    )

    def processes(self, workers: int) -> int:
        return workers

    def execute(self, job: Job) -> None:
        if job.workers == 1:
            job.train(0, 1)
            return
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(job.workers),
            "-m",
            "localsgd.worker",
            str(job.run_dir / "config.json"),
            "--run-dir",
            str(job.run_dir),
        ]
        # Workers import what this process can: an import-path workload in the current
        # directory too.
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, OMP_NUM_THREADS=str(job.threads), PYTHONPATH=path, **job.env)
        write_json_atomic(job.run_dir / "launch.json", {"command": command})
        log_path = job.run_dir / "workers.log"
        try:
            with log_path.open("w") as log:
                proc = subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=job.timeout
                )
        except subprocess.TimeoutExpired:
            raise WorkerFailure(
                ErrorInfo("TimeoutError", f"workers did not finish within {job.timeout} s", _tail(log_path))
            ) from None
        if proc.returncode != 0:
            error = root_error(job.run_dir) or ErrorInfo(
                "WorkersExited",
                f"workers exited with code {proc.returncode} without recording an error (see {log_path})",
                _tail(log_path),
            )
            raise WorkerFailure(error)

    def replicas(
        self,
        workload: Any,
        model: nn.Module,
        *,
        rank: int,
        world_size: int,
        workers: int,
        device: torch.device,
    ) -> Replicas:
        return ProcessReplica(workload, model, rank, world_size, device)


class ProcessReplica:
    """This process trains one replica; rank 0 evaluates."""

    flat = True
    comm: Communicator | None = None

    def __init__(
        self, workload: Any, model: nn.Module, rank: int, world_size: int, device: torch.device
    ) -> None:
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

    def worker_mean(self, value: torch.Tensor, dp: Any) -> float:
        mean = value.double().reshape(1)
        dp.comm.average([mean], record=False)
        return float(mean.item())

    def evaluate(self) -> dict[str, float]:
        return self.workload.evaluate(self.module, self.device) if self.rank == 0 else {}

    def final_model(self) -> nn.Module:
        return self.module

    def details(self) -> dict[str, Any]:
        return {}


PROCESSES = register(ProcessesEngine())

__all__ = ["PROCESSES", "ProcessReplica", "ProcessesEngine", "root_error", "write_worker_error"]
