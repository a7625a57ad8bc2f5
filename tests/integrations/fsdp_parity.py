"""Run under ``torchrun --nproc-per-node 4``: an FSDP2-sharded MLP on a 2 × 2 mesh
(replicate × shard) against the same algorithm on the unsharded MLP with 2 replicas.

Replica r is mesh row r; its two shard ranks each take half of the replica's batch, so
FSDP's gradient average over the shard group is the gradient of the whole batch. The
reference runs in the same processes: each rank trains a plain copy of the MLP on its
replica's whole batch under ``DataParallel`` over the replicate group (ranks 0 and 2, and
1 and 3, are the two replicas of two identical reference runs). Every rank saves what it
saw to ``OUT/rank{r}.pt`` and ends without the interpreter's teardown.
"""

from __future__ import annotations

import copy
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import localsgd
from localsgd import algorithms
from localsgd.comm.process_group import ProcessGroupCommunicator
from localsgd.util.lifetime import exit_process

BATCH = 8  # a replica's batch; each shard rank takes half
STEPS = 5


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    # 3 outputs: the last weight splits 2 + 1 over the shard ranks (FSDP pads the short one).
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


class ToDouble(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def two_dtypes(seed: int) -> nn.Sequential:
    """float32 then float64 layers (FSDP shards each layer in its own dtype)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), ToDouble(), nn.Linear(8, 3).double())


def shard(model: nn.Sequential, mesh: Any) -> nn.Sequential:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    return model


def batch(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * replica + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, replica: int, half: int | None, steps: range) -> None:
    for step in steps:
        x, y = batch(replica, step)
        if half is not None:
            x, y = x.chunk(2)[half], y.chunk(2)[half]
        opt.zero_grad()
        out = model(x)
        nn.functional.mse_loss(out, y.to(out.dtype)).backward()
        opt.step()


def full(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter, gathered over the shard group (collective)."""
    out = []
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(t.detach().clone())
    return out


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


Optimizer = Callable[[nn.Module], torch.optim.Optimizer]
SCENARIOS: dict[str, tuple[algorithms.AlgorithmConfig, Optimizer, Callable[[int], nn.Sequential]]] = {
    "local_sgd": (algorithms.LocalSGD(period=2), sgd, mlp),
    "local_sgd_avg_state": (algorithms.LocalSGD(period=2, optimizer_state="average"), sgd, mlp),
    "diloco": (algorithms.DiLoCo(period=2, outer_lr=0.7, outer_momentum=0.9), adamw, mlp),
    "slowmo": (algorithms.SlowMo(period=2, outer_lr=1.0, outer_momentum=0.5), sgd, mlp),
    "minibatch": (algorithms.MiniBatchSGD(), sgd, mlp),
    "post_local_sgd": (algorithms.PostLocalSGD(switch_step=2, period=2), sgd, mlp),
    "sma": (algorithms.SMA(), sgd, mlp),
    "two_dtypes": (algorithms.LocalSGD(period=2), sgd, two_dtypes),
}
MIDWAY = 3  # between two syncs of H = 2: the replicas differ


def scenario(name: str, mesh: Any, replica: int, half: int) -> dict[str, Any]:
    algorithm, make_opt, make_model = SCENARIOS[name]
    # Replicas start different: entering broadcasts replica 0's shards.
    model = shard(make_model(replica), mesh)
    opt = make_opt(model)
    with localsgd.DataParallel(model, opt, algorithm, mesh=mesh) as dp:
        train(model, opt, replica, half, range(MIDWAY))
        with dp.consensus():
            consensus = full(model)
        train(model, opt, replica, half, range(MIDWAY, STEPS))
    sharded = {"stats": dp.stats, "params": full(model), "consensus": consensus}
    shard_bytes = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())

    ref = make_model(replica)
    ref_opt = make_opt(ref)
    comm = ProcessGroupCommunicator(mesh.get_group("replicate"))
    with localsgd.DataParallel(ref, ref_opt, algorithm, comm=comm) as ref_dp:
        train(ref, ref_opt, replica, None, range(MIDWAY))
        with ref_dp.consensus():
            ref_consensus = [p.detach().clone() for p in ref.parameters()]
        train(ref, ref_opt, replica, None, range(MIDWAY, STEPS))
    reference = {
        "stats": ref_dp.stats,
        "params": [p.detach().clone() for p in ref.parameters()],
        "consensus": ref_consensus,
    }
    return {**sharded, "shard_bytes": shard_bytes, "reference": reference}


def resume(mesh: Any, replica: int, half: int) -> dict[str, Any]:
    """DiLoCo with AdamW: 3 steps, save, 3 more; against a fresh model that loads the save."""
    algorithm = algorithms.DiLoCo(period=2, outer_lr=0.7, outer_momentum=0.9)
    model = shard(mlp(seed=replica), mesh)
    opt = adamw(model)
    with localsgd.DataParallel(model, opt, algorithm, mesh=mesh) as dp:
        train(model, opt, replica, half, range(3))
        saved = io.BytesIO()
        torch.save(dp.state_dict(), saved)
        saved_opt = copy.deepcopy(opt.state_dict())
        # The other shard rank's state, as if the files were mixed up: its shapes may match.
        states: list[Any] = [None, None]
        dist.all_gather_object(states, dp.state_dict(), group=mesh.get_group("shard"))
        try:
            dp.load_state_dict(states[1 - half])
            mixed_up = ""
        except ValueError as e:
            mixed_up = str(e)
        train(model, opt, replica, half, range(3, 6))
        straight = [p.to_local().detach().clone() for p in model.parameters()]
    ended = full(model)

    model = shard(mlp(seed=7 + replica), mesh)
    opt = adamw(model)
    with localsgd.DataParallel(model, opt, algorithm, mesh=mesh) as dp:
        saved.seek(0)
        dp.load_state_dict(torch.load(saved, weights_only=True))
        opt.load_state_dict(saved_opt)
        train(model, opt, replica, half, range(3, 6))
        resumed = [p.to_local().detach().clone() for p in model.parameters()]
    return {
        "straight": straight,
        "resumed": resumed,
        "ended": ended,
        "resumed_ended": full(model),
        "mixed_up": mixed_up,
    }


def refusals(mesh: Any) -> dict[str, str]:
    """What DataParallel says to a model it cannot run (messages, per case)."""
    said = {}
    cases: dict[str, Callable[[], Any]] = {
        "hsdp": lambda: localsgd.DataParallel(
            (m := fully_shard(mlp(0), mesh=mesh)), sgd(m), algorithms.LocalSGD(period=2), mesh=mesh
        ),
        "world": lambda: localsgd.DataParallel(
            (m := shard(mlp(0), mesh)), sgd(m), algorithms.LocalSGD(period=2)
        ),
        "gradient_accumulation": lambda: localsgd.DataParallel(
            (m := shard(mlp(0), mesh)), sgd(m), algorithms.GradientAccumulation(steps=2), mesh=mesh
        ),
    }
    for key, make in cases.items():
        try:
            with make():
                pass
        except ValueError as e:
            said[key] = str(e)
    return said


def accelerate_drop_in(replica: int, half: int) -> dict[str, Any] | None:
    """localsgd's accelerate ``LocalSGD`` on a model sharded over accelerate's ``dp_shard``."""
    try:
        from accelerate import DistributedType
    except ImportError:
        return None
    from localsgd.integrations.accelerate import LocalSGD as DropIn

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    model = mlp(seed=replica)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    opt = sgd(model)

    def accelerator(**fields: Any) -> SimpleNamespace:
        # accelerate sets DistributedType.FSDP on accelerator devices only (CUDA, XPU, ...),
        # never on the CPU: an object holding what the drop-in reads of an FSDP2
        # Accelerator (ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)) stands in.
        base = {"distributed_type": DistributedType.FSDP, "is_fsdp2": True, "torch_device_mesh": mesh}
        return SimpleNamespace(**{**base, "_optimizers": [opt], **fields})

    with DropIn(accelerator=accelerator(), model=model, local_sgd_steps=2) as local_sgd:
        for step in range(STEPS):
            x, y = batch(replica, step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x.chunk(2)[half]), y.chunk(2)[half]).backward()
            opt.step()
            local_sgd.step()
    said = {}
    for key, fields in {"fsdp1": {"is_fsdp2": False}, "no_replicas": {"torch_device_mesh": None}}.items():
        try:
            with DropIn(accelerator=accelerator(**fields), model=model, local_sgd_steps=2):
                pass
        except (NotImplementedError, ValueError) as e:
            said[key] = str(e)
    return {"params": full(model), "stats": local_sgd.stats, "refusals": said}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    replica, half = mesh.get_local_rank("replicate"), mesh.get_local_rank("shard")
    result: dict[str, Any] = {"replica": replica, "half": half, "world_size": dist.get_world_size()}
    for name in SCENARIOS:
        result[name] = scenario(name, mesh, replica, half)
    result["resume"] = resume(mesh, replica, half)
    result["refusals"] = refusals(mesh)
    result["accelerate"] = accelerate_drop_in(replica, half)
    torch.save(result, out / f"rank{rank}.tmp")
    os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")  # complete or absent
    dist.barrier()
    dist.destroy_process_group()
    exit_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
