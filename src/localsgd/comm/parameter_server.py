"""Hosting a parameter server: blocking exchanges around the algorithm's server state, and
its transport over torch.distributed point-to-point messages.

The server lives in rank 0's process, beside rank 0's own training (so K workers are K
training processes, as for every other algorithm). Rank 0's worker calls the host directly;
every other rank k talks to a thread of rank 0 over a process group of its own, ``{0, k}``
(gloo ``send``/``recv``: the transport torch.distributed has for point-to-point tensors on
CPU). A pair group per worker keeps each thread on a gloo context nobody else uses, and
lets a worker's death break its own connection only: rank 0's thread for k sees the
closed connection, the server records k as lost, and training goes on with the rest.

Messages on a pair (tensors on CPU; models travel as the caller's flat per-dtype tensors):
worker -> server ``[kind]`` then, for a push, the model's tensors; server -> worker
``[version]`` then the model's tensors. Kinds: push (reply: the model the push produced),
pull (reply: the current model), finish (reply, once every worker finished or was lost:
the final model).
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from localsgd.comm.base import PULL, PUSH, CommStats, Server

log = logging.getLogger(__name__)

LOST: dict[int, int | None] = {}
"""Workers this process's server lost, by rank, with the version at which it lost each
(None: unknown): what rank 0 names when it is stopped from outside after a loss."""

KIND_PUSH, KIND_PULL, KIND_FINISH = 1, 2, 3
PAIR_TIMEOUT = datetime.timedelta(days=7)
"""A pair's operations may wait as long as a worker's slowest round or the end of the run:
a dead peer is noticed by its closed connection, not by a timeout."""
JOIN_TIMEOUT = 60.0


class ServerHost:
    """A server's state behind a lock, with calls that wait: a push returns once its worker
    may go on (a staleness bound may hold it before it is applied or, under SSP, after), a
    finish once every worker is done. Every change wakes every waiting thread, a lost
    worker's included, so a worker waiting for one that died goes on once it is lost."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._cond = threading.Condition()

    def exchange(self, worker: int, model: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> int:
        with self._cond:
            self.server.push(worker, model)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.server.ready(worker))
            return self.server.model(out, worker)

    def pull(self, out: Sequence[torch.Tensor]) -> int:
        with self._cond:
            return self.server.model(out)

    def finish(self, worker: int, out: Sequence[torch.Tensor]) -> int:
        with self._cond:
            self.server.finish(worker)
            self._cond.notify_all()
            self._cond.wait_for(self.server.finished)
            return self.server.model(out)

    def lose(self, worker: int) -> None:
        with self._cond:
            self.server.lose(worker)
            self._cond.notify_all()


def record_exchange(stats: CommStats, tensors: Sequence[torch.Tensor], seconds: float) -> None:
    """Count one exchange: a push and a pull of the model's bytes (the seconds, waiting
    for admission included, go to the push)."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    stats.record(PUSH, nbytes, seconds)
    stats.record(PULL, nbytes, 0.0)


def record_pull(stats: CommStats, tensors: Sequence[torch.Tensor], seconds: float) -> None:
    stats.record(PULL, sum(t.numel() * t.element_size() for t in tensors), seconds)


class PairChannels:
    """Rank 0's threads (one per other rank) and every rank's end of its pair group."""

    def __init__(self, world_size: int, rank: int, host: ServerHost | None, template: Sequence[torch.Tensor]):
        import torch.distributed as dist

        self.rank = rank
        self.host = host
        # new_group is collective over the world: every rank creates every pair, in order.
        self.groups: dict[int, Any] = {}
        for k in range(1, world_size):
            group = dist.new_group([0, k], timeout=PAIR_TIMEOUT, backend="gloo")
            if rank in (0, k):
                self.groups[k] = group
        self.template = [torch.empty(t.shape, dtype=t.dtype) for t in template]
        self.threads: list[threading.Thread] = []
        if rank == 0:
            assert host is not None
            for k in self.groups:
                thread = threading.Thread(target=self._serve, args=(k,), name=f"ps-worker{k}", daemon=True)
                thread.start()
                self.threads.append(thread)

    # -- rank 0: one thread per worker ---------------------------------------------------------

    def _serve(self, k: int) -> None:
        import torch.distributed as dist

        assert self.host is not None
        group = self.groups[k]
        buffers = [t.clone() for t in self.template]
        header = torch.zeros(1, dtype=torch.int64)
        try:
            while True:
                dist.recv(header, src=k, group=group)
                kind = int(header.item())
                if kind == KIND_PUSH:
                    for t in buffers:
                        dist.recv(t, src=k, group=group)
                    version = self.host.exchange(k, buffers, buffers)
                elif kind == KIND_PULL:
                    version = self.host.pull(buffers)
                elif kind == KIND_FINISH:
                    version = self.host.finish(k, buffers)
                else:
                    raise RuntimeError(f"parameter server: unknown message kind {kind} from rank {k}")
                dist.send(torch.tensor([version], dtype=torch.int64), dst=k, group=group)
                for t in buffers:
                    dist.send(t, dst=k, group=group)
                if kind == KIND_FINISH:
                    return
        except Exception as exc:  # the worker's process died (its connection closed)
            log.warning("parameter server: lost worker %d: %s", k, exc)
            self.host.lose(k)
            LOST[k] = getattr(self.host.server, "lost", {}).get(k)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(JOIN_TIMEOUT)

    # -- a worker of rank k > 0 ----------------------------------------------------------------

    def request(self, kind: int, tensors: Sequence[torch.Tensor]) -> int:
        import torch.distributed as dist

        group = self.groups[self.rank]
        dist.send(torch.tensor([kind], dtype=torch.int64), dst=0, group=group)
        if kind == KIND_PUSH:
            for t in tensors:
                dist.send(t.detach().cpu(), dst=0, group=group)
        header = torch.zeros(1, dtype=torch.int64)
        dist.recv(header, src=0, group=group)
        for t in tensors:
            if t.device.type == "cpu" and t.is_contiguous():
                dist.recv(t.data, src=0, group=group)
            else:
                staged = torch.empty(t.shape, dtype=t.dtype)
                dist.recv(staged, src=0, group=group)
                with torch.no_grad():
                    t.copy_(staged)
        return int(header.item())


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start
