"""Sharded models (FSDP2's ``fully_shard``) under :class:`~localsgd.DataParallel`.

On a 2-D device mesh (replicate × shard) the model is sharded over the ``shard`` dimension:
the S ranks of a shard group hold one replica between them, each rank a slice of every
parameter (a ``DTensor``), and FSDP averages their gradients within the group. The
algorithm runs across the ``replicate`` dimension: each rank averages its local shards with
the same shards of the other R - 1 replicas, over the replicate process group, so a sync
moves each rank's shard bytes once, one collective per dtype.

FSDP2 keeps each parameter's shard in a storage of its own (padded, what its all-gather
reads), so the shards are not re-laid out into one flat buffer (``flat=`` does not apply):
a sync packs them into one buffer per dtype and copies the result back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from localsgd.comm.process_group import ProcessGroupCommunicator


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor``, sharing its storage (writes reach the
    ``DTensor``); any other tensor as it is, detached."""
    to_local = getattr(t, "to_local", None)  # DTensor's; no import where distributed is absent
    if to_local is None:
        return t.detach()
    with torch.no_grad():  # under no_grad it is the DTensor's own local tensor, not a copy
        local: torch.Tensor = to_local()
    return local.detach()


REPLICATE = "replicate"
"""The mesh dimension the algorithm averages over; every other dimension shards."""


def replicate_communicator(mesh: Any) -> ProcessGroupCommunicator:
    """A communicator over the replicas: ``mesh``'s ``replicate`` dimension, or ``mesh``
    itself when it is 1-D (a replicate submesh such as accelerate's ``mesh["dp_replicate"]``)."""
    from localsgd.comm.process_group import ProcessGroupCommunicator

    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if getattr(mesh, "ndim", None) == 1:
        return ProcessGroupCommunicator(mesh.get_group())
    if REPLICATE not in names:
        raise ValueError(
            f"mesh must be a DeviceMesh with a {REPLICATE!r} dimension "
            f"(init_device_mesh(..., mesh_dim_names=('replicate', 'shard'))) or a 1-D replicate "
            f"mesh, got dimensions {names}"
        )
    return ProcessGroupCommunicator(mesh.get_group(REPLICATE))


def is_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor`` (FSDP2 made it a shard)."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def settle(model: nn.Module) -> None:
    """Let FSDP finish its lazy initialisation now, before the local shards are taken.

    FSDP2 runs it on the first forward pass, and there re-pads the shard of any parameter
    whose local tensor was replaced since ``fully_shard`` (``load_state_dict(assign=True)``,
    a conversion through ``nn.Module._apply``) into a new storage: views taken earlier
    would no longer be the model's. The root's state object has no public way to run it,
    so this calls what its forward pre-hook calls (idempotent, and a no-op for parameters
    left as ``fully_shard`` made them)."""
    get_state = getattr(model, "_get_fsdp_state", None)
    if get_state is None:
        return
    lazy_init = getattr(get_state(), "_lazy_init", None)
    if lazy_init is not None:
        lazy_init()


def check_shard_mesh(params: Sequence[torch.Tensor], comm: Any) -> None:
    """Refuse parameters placed over ranks that the algorithm averages among.

    Two mistakes end here. A communicator over ranks that hold different shards of one
    replica (the world's, when ``mesh=`` was left out) would average unrelated slices. A
    model passed to ``fully_shard`` with the whole 2-D mesh (HSDP) has FSDP all-reduce its
    gradients over the replicate dimension at every step, which is mini-batch SGD whatever
    the algorithm. Either way the model must be sharded over ``mesh["shard"]`` only and the
    algorithm run over ``mesh["replicate"]``."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if comm.world_size == 1 or not hasattr(comm, "group"):
        return  # nothing to average with, or a communicator without process groups
    group = comm.group
    replicas = set(dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size()))
    for p in params:
        if not isinstance(p, DTensor):
            continue
        mesh = p.device_mesh
        for dim in range(mesh.ndim):
            members = set(dist.get_process_group_ranks(mesh.get_group(dim)))
            if len(members & replicas) > 1:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is placed over ranks {sorted(members)}, "
                    f"of which {sorted(members & replicas)} are in the group the algorithm averages "
                    f"over {sorted(replicas)}: an average would mix different shards, or FSDP would "
                    'average it every step (HSDP); shard with fully_shard(module, mesh=mesh["shard"]) '
                    "and pass DataParallel(..., mesh=mesh)"
                )


def shard_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by name, as this rank holds them (local shards)."""
    named: dict[str, torch.Tensor] = {n: local_tensor(p) for n, p in model.named_parameters()}
    named.update(dict(model.named_buffers()))
    return named


def layout(model: nn.Module) -> dict[str, list[Any]]:
    """Where each sharded parameter's local shard sits: its global shape, placements and
    this rank's coordinate on the parameter's mesh. Empty for a model with no shards."""
    found: dict[str, list[Any]] = {}
    if not is_sharded(list(model.parameters())):
        return found
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            found[name] = [
                list(p.shape),
                [str(x) for x in p.placements],
                list(p.device_mesh.get_coordinate() or []),
            ]
    return found


def check_layout(saved: Any, current: dict[str, list[Any]]) -> None:
    """Refuse a state saved by another shard (another rank's file, another mesh or split):
    its tensors could have this rank's shapes and still hold other slices of the model."""
    saved = saved or {}
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            raise ValueError(
                f"state replica {name!r} was saved as shard {saved.get(name)} (global shape, "
                f"placements, mesh coordinate); this rank holds {current.get(name)}: load each "
                "rank's own state, on the same mesh and sharding"
            )
