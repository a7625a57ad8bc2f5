"""The communicator of stacked replicas: ``average`` is a mean over the replica dimension,
and its counters are those the process engine would have recorded on each rank; and the
elementwise optimizers that step stacked tensors exactly."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from localsgd.comm.base import (
    WORLD,
    Block,
    CommStats,
    PendingAverage,
    Scope,
    Server,
    ServerFactory,
    WireCodec,
    check_block,
)
from localsgd.comm.flat import group_by_dtype, reduction_dtype
from localsgd.comm.parameter_server import record_exchange, record_pull

if TYPE_CHECKING:
    from localsgd.engines.simulated.asynchrony import Asynchrony

log = logging.getLogger(__name__)

# Optimizers whose update of a stacked tensor equals the per-replica updates: each element
# depends only on its own gradient and state (no norms or products across elements).
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


def check_elementwise(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers whose step mixes elements (the stacked step would mix replicas).
    Besides torch's, an optimizer class may declare itself elementwise with the class
    attribute ``elementwise = True`` (the engine cannot see inside its step)."""
    if (
        not isinstance(optimizer, ELEMENTWISE_OPTIMIZERS)
        and getattr(type(optimizer), "elementwise", False) is not True
    ):
        allowed = sorted(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
        raise ValueError(
            f"the simulated engine steps all replicas as one stacked tensor, which is exact only "
            f"for elementwise optimizers; {type(optimizer).__name__} is not one of {allowed} "
            "and does not declare elementwise = True"
        )


def replica_span(tensors: Sequence[torch.Tensor], replicas: int) -> torch.Tensor | None:
    """A ``[K, n]`` view covering ``tensors`` if they are consecutive column blocks of one
    ``[K, P]`` storage (each a ``[K, ...]`` slice whose rows are contiguous), else None."""
    first = tensors[0]
    if first.dim() == 0 or first.shape[0] != replicas:
        return None
    row_stride = first.stride(0)
    ptr = first.untyped_storage().data_ptr()
    start = first.storage_offset()
    expected = start
    for t in tensors:
        if (
            t.dim() == 0
            or t.shape[0] != replicas
            or (replicas > 1 and t.stride(0) != row_stride)
            or t.storage_offset() != expected
            or t.untyped_storage().data_ptr() != ptr
            or not t[0].is_contiguous()
        ):
            return None
        expected += t[0].numel()
    return first.as_strided((replicas, expected - start), (row_stride, 1), start)


class _Deferred:
    """An average of stacked replicas, taken when waited on."""

    def __init__(self, comm: SimulatedCommunicator, tensors: list[torch.Tensor], scope: Scope, record: bool) -> None:
        self._comm: SimulatedCommunicator | None = comm
        self._tensors = tensors
        self._scope = scope
        self._record = record

    def wait(self) -> None:
        if self._comm is not None:
            self._comm.average(self._tensors, self._scope, record=self._record)
            self._comm = None
            self._tensors = []


class SimulatedCommunicator:
    """The communicator of K stacked replicas: ``average`` is a mean over dimension 0
    (within blocks of G consecutive replicas for a block scope).

    ``groups`` > 1: the stacked replicas are that many independent worlds of K each (the
    trials of :class:`TrialReplicas`), consecutive along dimension 0; every collective
    stays inside its world, and ``world_size`` is K.

    Counters match the process engine's per-rank counters: one collective per dtype per
    call, ``bytes`` = one replica's payload (an average of bf16/fp16 tensors in fp32, the
    dtype it is reduced in, as there). ``seconds`` is the time the mean took here,
    not a network time (the cost model estimates that).
    """

    def __init__(self, replicas: int, groups: int = 1) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self._k = replicas
        self._worlds = groups
        self._stacked = replicas * groups
        self._stats = CommStats()
        self.server: Server | None = None
        self.schedule: Asynchrony | None = None
        """Set when replicas reach the server in their own time (see simulated_async);
        otherwise every replica pushes at every push, in index order."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return self._k

    @property
    def stats(self) -> CommStats:
        return self._stats

    def prepare(self, scope: Scope) -> None:
        if isinstance(scope, Block):
            check_block(scope, self._k)

    def _groups(
        self, tensors: Sequence[torch.Tensor], wire: bool = False
    ) -> Iterator[tuple[list[torch.Tensor], int]]:
        """Tensors grouped by dtype, with one replica's bytes; ``wire``: in the dtype an
        average sends them in (fp32 for bf16/fp16, as the process engine)."""
        for members in group_by_dtype(tensors).values():
            for t in members:
                if t.dim() == 0 or t.shape[0] != self._stacked:
                    raise ValueError(
                        f"simulated engine: expected tensors stacked along a leading replica "
                        f"dimension of {self._stacked}, got shape {tuple(t.shape)}"
                    )
            size = reduction_dtype(members[0].dtype).itemsize if wire else members[0].element_size()
            yield members, sum(t[0].numel() * size for t in members)

    @torch.no_grad()
    def average(
        self,
        tensors: Sequence[torch.Tensor],
        scope: Scope = WORLD,
        *,
        record: bool = True,
        codec: WireCodec | None = None,
    ) -> None:
        size = scope.size if isinstance(scope, Block) else self._k
        if isinstance(scope, Block):
            check_block(scope, self._k)
        if size == 1 or not tensors:
            return  # as the process engine: a group of one exchanges and counts nothing
        if codec is not None:
            self._average_encoded(tensors, scope, size, record, codec)
            return
        for members, nbytes in self._groups(tensors, wire=True):
            start = time.perf_counter()
            span = replica_span(members, self._stacked)
            wide = reduction_dtype(members[0].dtype)
            for view in [span] if span is not None else members:
                blocks = view.unflatten(0, (self._stacked // size, size))
                mean = blocks.mean(1, keepdim=True, dtype=wide)  # bf16/fp16: in fp32, rounded once
                blocks.copy_(mean.expand_as(blocks))
            if record:
                self._stats.record(scope.label(), nbytes, time.perf_counter() - start)

    def start_average(
        self, tensors: Sequence[torch.Tensor], scope: Scope = WORLD, *, record: bool = True
    ) -> PendingAverage:
        """Nothing moves until ``wait()``: the mean is taken then, so the result becomes
        visible exactly when a worker process would see it, and is counted then, as there.
        (Nobody may write to ``tensors`` in between, so taking the mean late changes nothing.)"""
        if isinstance(scope, Block):
            check_block(scope, self._k)
        return _Deferred(self, list(tensors), scope, record)

    def _average_encoded(
        self, tensors: Sequence[torch.Tensor], scope: Scope, size: int, record: bool, codec: WireCodec
    ) -> None:
        """The process engine's compressed average, every replica at once: each replica's
        payload encoded from its own row, and the block's payloads decoded and averaged in
        replica order as each rank does, once per block (the values are laid out [blocks,
        G, n]; each member's payload is a [blocks, 1, B] view, and the mean broadcasts back
        to the block's rows)."""
        stacked = self._stacked

        def gather(payload: torch.Tensor) -> list[torch.Tensor]:
            return [payload[:, j : j + 1] for j in range(size)]

        for slot, (members, _) in enumerate(self._groups(tensors)):
            start = time.perf_counter()
            span = replica_span(members, stacked)
            flat = span if span is not None else torch.cat([t.reshape(stacked, -1) for t in members], 1)
            coded = codec.exchange(slot, flat.unflatten(0, (stacked // size, size)), gather)
            if span is None:
                for t, piece in zip(members, flat.split([t[0].numel() for t in members], 1)):
                    t.copy_(piece.view_as(t))
            if record:
                seconds = time.perf_counter() - start
                self._stats.record(scope.label(), coded.nbytes, seconds, gathered=True, coded=coded)

    @torch.no_grad()
    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0, *, record: bool = True) -> None:
        if not tensors or self._k == 1:
            return
        for members, nbytes in self._groups(tensors):
            start = time.perf_counter()
            for t in members:
                worlds = t.unflatten(0, (self._worlds, self._k))
                worlds.copy_(worlds[:, src : src + 1].expand_as(worlds))
            if record:
                self._stats.record("world", nbytes, time.perf_counter() - start)

    # -- a parameter server: this engine hosts it and plays every worker, in event order ------

    def serve(self, tensors: Sequence[torch.Tensor], server: ServerFactory) -> None:
        if self._worlds > 1:
            # One server holds one world's model; trials of a search are separate worlds.
            raise ValueError("a parameter server serves one world of replicas, not trials batched together")
        self.server = server([t[0].detach().clone() for t in tensors])

    def _server(self) -> Server:
        if self.server is None:
            raise RuntimeError("push/pull need a parameter server: call serve() first")
        return self.server

    @torch.no_grad()
    def push(self, tensors: Sequence[torch.Tensor], *, record: bool = True) -> None:
        server = self._server()
        start = time.perf_counter()

        def rows(k: int) -> list[torch.Tensor]:
            return [t[k] for t in tensors]

        if self.schedule is not None:
            pushes = self.schedule.push(rows)
        else:
            for k in range(self._k):
                server.push(k, rows(k))
            for k in range(self._k):
                if not server.ready(k):
                    raise RuntimeError(f"simulated engine: replica {k}'s push waits, and every replica has pushed")
                server.model(rows(k), k)
            pushes = self._k
        if record and pushes:
            # What one worker process counts: its exchanges (the same number for each in
            # lockstep; their mean with unequal speeds).
            for _ in range(round(pushes / self._k)):
                record_exchange(self._stats, rows(0), (time.perf_counter() - start) / pushes)

    @torch.no_grad()
    def pull(self, tensors: Sequence[torch.Tensor], *, final: bool = False, record: bool = True) -> int:
        server = self._server()
        start = time.perf_counter()
        if final:
            for k in range(self._k):
                server.finish(k)
            if not server.finished():
                raise RuntimeError("simulated engine: replicas still wait for the server at the end")
        version = server.model([t[0] for t in tensors])
        for t in tensors:
            t.copy_(t[0:1].expand_as(t))
        if record:
            record_pull(self._stats, [t[0] for t in tensors], time.perf_counter() - start)
        return version


