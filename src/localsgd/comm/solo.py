"""The communicator of a world of one process: nothing to exchange, nothing counted."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from localsgd.comm.base import (
    WORLD,
    Block,
    CommStats,
    PendingAverage,
    Scope,
    ServerFactory,
    WireCodec,
    check_block,
)
from localsgd.comm.parameter_server import ServerHost, record_exchange, record_pull


class Landed:
    """An average that had nothing to exchange: it has landed already."""

    def wait(self) -> None:
        return None


LANDED = Landed()


class SoloCommunicator:
    """Every collective is the identity when there is a single replica; a parameter server
    is hosted here, with this replica its only worker."""

    def __init__(self) -> None:
        self._stats = CommStats()
        self._host: ServerHost | None = None

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def stats(self) -> CommStats:
        return self._stats

    def prepare(self, scope: Scope) -> None:
        if isinstance(scope, Block):
            check_block(scope, 1)

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        scope: Scope = WORLD,
        *,
        record: bool = True,
        codec: WireCodec | None = None,
    ) -> None:
        return None

    def start_average(
        self, tensors: Sequence[torch.Tensor], scope: Scope = WORLD, *, record: bool = True
    ) -> PendingAverage:
        return LANDED

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0, *, record: bool = True) -> None:
        return None

    def serve(self, tensors: Sequence[torch.Tensor], server: ServerFactory) -> None:
        self._host = ServerHost(server([t.detach().clone() for t in tensors]))

    def _server(self) -> ServerHost:
        if self._host is None:
            raise RuntimeError("push/pull need a parameter server: call serve() first")
        return self._host

    def push(self, tensors: Sequence[torch.Tensor], *, record: bool = True) -> None:
        start = time.perf_counter()
        self._server().exchange(0, tensors, tensors)
        if record:
            record_exchange(self._stats, tensors, time.perf_counter() - start)

    def pull(self, tensors: Sequence[torch.Tensor], *, final: bool = False, record: bool = True) -> int:
        start = time.perf_counter()
        host = self._server()
        version = host.finish(0, tensors) if final else host.pull(tensors)
        if record:
            record_pull(self._stats, tensors, time.perf_counter() - start)
        return version
