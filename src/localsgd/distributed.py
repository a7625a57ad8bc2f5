"""Process-group set-up from torchrun's environment."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from localsgd.util.lifetime import restart_attempt

log = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world, its device and the backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None


def init_distributed(backend: str | None = None, timeout: datetime.timedelta | float = 300.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise; on CUDA the
    process binds to ``cuda:LOCAL_RANK``. Already initialized: nothing is done and the
    current group is described. No torchrun environment (a plain ``python`` run): a world
    of one, nothing is initialized.
    """
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None (automatic), got {backend!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (backend == "nccl") or (backend is None and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA, and no CUDA device is available")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > torch.cuda.device_count():
            raise ValueError(
                f"{local_world} processes on this node but {torch.cuda.device_count()} CUDA devices: "
                "NCCL needs one device per process; use backend='gloo' (CPU) or fewer processes"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        if len(missing) < len(_TORCHRUN_VARS):
            raise RuntimeError(
                f"incomplete torch.distributed environment: {missing} unset "
                f"(torchrun sets all of {list(_TORCHRUN_VARS)})"
            )
        return DistInfo(0, 1, 0, device, None)
    chosen = backend or ("nccl" if use_cuda else "gloo")
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    store = _store(timeout)
    if store is None:
        dist.init_process_group(chosen, timeout=timeout)
    else:
        dist.init_process_group(
            chosen, store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout
        )
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, chosen)
    log.info("rank %d/%d: joined the %s process group on %s", info.rank, info.world_size, chosen, device)
    return info


def _store(timeout: datetime.timedelta) -> dist.Store | None:
    """The process group's store where torch's own choice falls short (None: torch's):

    - under torch's elastic agent, the agent's store with a prefix per attempt (the
      rendezvous round, the same on every node): the agent keeps one store across restarts
      of the group, and a restarted group that reads the addresses the previous one
      published fails or hangs in gloo's connections;
    - with a loopback ``MASTER_ADDR``, rank 0's store server listening on that address
      alone (torch's listens on every interface, whatever address it is given)."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    world_size = int(os.environ["WORLD_SIZE"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        attempt = restart_attempt()
        agent = dist.TCPStore(address, port, world_size, False, timeout)
        return dist.PrefixStore(f"localsgd/attempt{attempt}", agent)
    if _loopback(address):
        # Every rank passes the store itself: torch prefixes a store it made, not one given.
        if os.environ["RANK"] != "0":
            return dist.TCPStore(address, port, world_size, False, timeout)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.create_server((address, port), family=family)
        return dist.TCPStore(address, port, world_size, True, timeout, master_listen_fd=listener.detach())
    return None


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def destroy_distributed() -> None:
    """Leave the process group if one is up; safe to call always (e.g. in ``finally``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``cuda`` or ``cpu`` for this process. ``auto`` takes CUDA when every process on this
    node can have its own device (what NCCL needs), else the CPU; ``cuda`` without enough
    devices is a ``ValueError``."""
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
