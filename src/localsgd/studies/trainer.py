"""One training run on this process's rank: the loop every engine and command shares.

Every rank runs :func:`train`; rank 0 alone writes the run record (metrics, status,
checkpoint) into the run folder it is given.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from localsgd.studies.store import write_json_atomic

log = logging.getLogger(__name__)


class Diverged(Exception):
    """The training loss became NaN or infinite."""


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``cuda`` or ``cpu`` for this process. ``auto`` takes CUDA when every process on this
    node can have its own device (what NCCL needs), else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    enough = torch.cuda.is_available() and local_world <= torch.cuda.device_count()
    if name == "cuda" and not enough:
        raise ValueError(
            f"device = 'cuda' needs one CUDA device per worker process on this node "
            f"({local_world} processes, {torch.cuda.device_count()} devices); use 'auto' or 'cpu'"
        )
    if name == "cuda" or (name == "auto" and enough):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


def environment(world_size: int, backend: str | None, device: torch.device) -> dict[str, Any]:
    import numpy

    import localsgd

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "localsgd": localsgd.__version__,
        "git_sha": git_sha(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "command": sys.argv,
        "world_size": world_size,
        "backend": backend,
        "device": str(device),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class MetricsWriter:
    """Appends evaluation rows to ``metrics.jsonl`` (rank 0 only; others discard)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.file = (run_dir / "metrics.jsonl").open("w") if run_dir is not None else None
        self.rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def train(
    config: Any, run_dir: Path | None, rank: int, world_size: int, backend: str | None = None
) -> dict[str, Any]:
    """Train ``config`` (a :class:`~localsgd.studies.schema.RunConfig`) on this rank.

    ``run_dir`` is where rank 0 writes the record; other ranks pass None. Returns the
    status dict (also written as ``status.json``). Errors are recorded and re-raised;
    divergence is recorded as ``diverged`` and returned.
    """
    device = resolve_device(config.device)
    torch.set_num_threads(config.threads)
    writer = MetricsWriter(run_dir)
    if run_dir is not None:
        write_json_atomic(run_dir / "env.json", environment(world_size, backend, device))
    status: dict[str, Any]
    try:
        status = _train(config, run_dir, writer, rank, world_size, device)
    except Diverged as exc:
        status = _status("diverged", str(exc), writer.rows)
    except BaseException as exc:
        status = _status("failed", "".join(traceback.format_exception(exc)).strip(), writer.rows)
        if run_dir is not None:
            write_json_atomic(run_dir / "status.json", status)
        raise
    finally:
        writer.close()
    if run_dir is not None:
        write_json_atomic(run_dir / "status.json", status)
    return status


def _status(kind: str, error: str | None, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    last = rows[-1] if rows else {}
    accs = [r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None]
    wall = last.get("wall_seconds", 0.0)
    return {
        "status": kind,
        "error": error,
        "steps": last.get("step", 0),
        "epochs": last.get("epoch", 0.0),
        "samples": last.get("samples", 0),
        "wall_seconds": wall,
        "samples_per_second": (last.get("samples", 0) / wall) if wall else None,
        "best_test_accuracy": max(accs) if accs else None,
        "final": last,
        **extra,
    }


class ProcessReplica:
    """The process engine's view: this process trains one replica; rank 0 evaluates."""

    flat = True
    comm = None

    def __init__(
        self, workload: Any, model: nn.Module, rank: int, world_size: int, device: torch.device
    ) -> None:
        self.workload, self.module, self.rank, self.world_size, self.device = (
            workload,
            model,
            rank,
            world_size,
            device,
        )

    def batches(self, batch: int, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.workload.train_batches(self.rank, self.world_size, batch, epoch, seed, self.device)

    def forward_backward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        loss = self.workload.loss(self.module(x), y)
        loss.backward()
        return loss.detach()

    def worker_mean(self, value: torch.Tensor, dp: Any) -> float:
        mean = value.double().reshape(1)
        dp.comm.average([mean], record=False)
        return float(mean.item())

    def evaluate(self) -> dict[str, Any]:
        return self.workload.evaluate(self.module, self.device) if self.rank == 0 else {}

    def final_model(self) -> nn.Module:
        return self.module


class SimulatedReplicas:
    """The simulated engine's view: all K replicas stacked in this process."""

    flat = False

    def __init__(self, workload: Any, model: nn.Module, replicas: int, device: torch.device) -> None:
        from localsgd.engines.simulated import ReplicaGradients, SimulatedCommunicator, StackedModel

        self.workload, self.replicas, self.device = workload, replicas, device
        self.module = StackedModel(model, replicas)
        self.gradients = ReplicaGradients(self.module, workload.loss)
        self.comm = SimulatedCommunicator(replicas)

    def batches(self, batch: int, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Replica k reads exactly the shard rank k reads in the process engine.
        streams = [
            self.workload.train_batches(k, self.replicas, batch, epoch, seed, self.device)
            for k in range(self.replicas)
        ]
        for group in zip(*streams):
            yield torch.stack([x for x, _ in group]), torch.stack([y for _, y in group])

    def forward_backward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.gradients(*batch)

    def worker_mean(self, value: torch.Tensor, dp: Any) -> float:
        return float(value.double().mean().item())

    def evaluate(self) -> dict[str, Any]:
        # Called under consensus(): every replica holds the consensus model.
        return self.workload.evaluate(self.module.load_replica_into_template(0), self.device)

    def final_model(self) -> nn.Module:
        return self.module.load_replica_into_template(0)


def _train(
    config: Any,
    run_dir: Path | None,
    writer: MetricsWriter,
    rank: int,
    world_size: int,
    device: torch.device,
) -> dict[str, Any]:
    import localsgd
    from localsgd import workloads
    from localsgd.studies import recipes

    simulated = config.engine == "simulated"
    workers = config.workers
    if not simulated and world_size != workers:
        raise ValueError(f"workers = {workers} but the process group has {world_size} ranks")
    options = {"num_samples": config.data.num_samples, "data_path": config.data.path}
    workload = workloads.build(config.workload, **{k: v for k, v in options.items() if v is not None})
    batch = config.data.batch_size
    steps_per_epoch = workload.steps_per_epoch(workers, batch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"data.batch_size = {batch} x {workers} workers exceeds the {workload.train_size} "
            "training samples: not one step per epoch"
        )
    total_steps = math.ceil(config.train.epochs * steps_per_epoch)
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    algorithm = config.algorithm_config(steps_per_epoch)
    torch.manual_seed(config.seed)
    model = workload.make_model(config.seed).to(device)
    replicas: ProcessReplica | SimulatedReplicas
    if simulated:
        from localsgd.engines.simulated import check_elementwise

        replicas = SimulatedReplicas(workload, model, workers, device)
        ndim = replicas.module.replica_ndim
        optimizer = recipes.build_optimizer(replicas.module, config.optimizer, ndim=lambda p: ndim[id(p)])
        check_elementwise(optimizer)
    else:
        replicas = ProcessReplica(workload, model, rank, world_size, device)
        optimizer = recipes.build_optimizer(model, config.optimizer)
    global_batch = batch * workers

    def lr(step: int) -> float:
        return recipes.lr_at(
            step, total_steps, steps_per_epoch, config.optimizer.lr, config.schedule, global_batch
        )

    step = 0
    train_seconds = 0.0
    loss_sum: torch.Tensor | float = 0.0
    loss_count = 0
    with localsgd.DataParallel(
        replicas.module, optimizer, algorithm, comm=replicas.comm, flat=replicas.flat
    ) as dp:

        def evaluate() -> dict[str, Any]:
            nonlocal loss_sum, loss_count
            mean = loss_sum / max(loss_count, 1)
            train_loss = replicas.worker_mean(torch.as_tensor(mean, dtype=torch.float64), dp)
            loss_sum, loss_count = 0.0, 0
            with dp.consensus():
                scores = replicas.evaluate()
            stats = dp.stats
            row = {
                "step": step,
                "epoch": step / steps_per_epoch,
                "samples": step * global_batch,
                "wall_seconds": train_seconds,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                "test_loss": scores.get("test_loss"),
                "test_accuracy": scores.get("test_accuracy"),
                "bytes": stats["bytes"],
                "syncs": stats["syncs"],
                "collectives": stats["collectives"],
                "comm_seconds": stats["comm_seconds"],
                "by_scope": stats["by_scope"],
            }
            writer.write(row)
            if rank == 0:
                log.info(
                    "rank 0 step %d epoch %.2f: train loss %.4f, test acc %s",
                    step,
                    row["epoch"],
                    train_loss,
                    row["test_accuracy"],
                )
            if not math.isfinite(train_loss):
                # Every rank sees the same averaged loss, so all stop together.
                raise Diverged(f"train loss is {train_loss} at step {step}")
            return row

        epoch = 0
        while step < total_steps:
            batches = iter(replicas.batches(batch, epoch, config.seed))
            while True:
                start = time.perf_counter()  # data loading and augmentation count as training
                data = next(batches, None)
                if data is None:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr(step)
                optimizer.zero_grad()
                loss_sum = loss_sum + replicas.forward_backward(data)
                optimizer.step()
                loss_count += 1
                step += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_seconds += time.perf_counter() - start
                if step % config.train.eval_every == 0 or step == total_steps:
                    evaluate()
                if step >= total_steps:
                    break
            epoch += 1
        # Leaving the block puts the consensus model on every rank.
    final_stats = dp.stats
    if run_dir is not None:
        tmp = run_dir / ".checkpoint.pt.tmp"
        torch.save(
            {"model": replicas.final_model().state_dict(), "config": config.to_dict(), "step": step}, tmp
        )
        os.replace(tmp, run_dir / "checkpoint.pt")
    extra: dict[str, Any] = {}
    if simulated:
        assert isinstance(replicas, SimulatedReplicas)
        extra["vectorized"] = replicas.gradients.vectorized
        extra["fallback_reason"] = replicas.gradients.fallback_reason
    return _status(
        "completed",
        None,
        writer.rows,
        stats=final_stats,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        global_batch=global_batch,
        algorithm=algorithm.to_dict(),
        engine=config.engine,
        **extra,
    )
