"""The communicator over real ``torch.distributed`` process groups (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

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
from localsgd.comm.flat import contiguous_span, group_by_dtype, pack, reduction_dtype, unpack
from localsgd.comm.parameter_server import (
    KIND_FINISH,
    KIND_PULL,
    KIND_PUSH,
    PairChannels,
    ServerHost,
    record_exchange,
    record_pull,
)


class _Route(NamedTuple):
    """A scope's process group, size, counter label, 1/size where the backend cannot
    average (None where it can) and injected delay."""

    group: Any
    size: int
    label: str
    scale: float | None
    pause: float


def _flats(tensors: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor] | None]]:
    """One flat buffer per dtype, with the tensors to copy its result back into (None when
    the buffer is their own storage: a collective on it works in place)."""
    for members in group_by_dtype(tensors).values():
        single = members[0]
        if len(members) == 1 and single.dim() == 1 and single.is_contiguous():
            yield single.detach(), None
            continue
        span = contiguous_span(members)
        if span is not None:
            yield span, None
        else:
            yield pack(members), members


class _Part(NamedTuple):
    """One collective of an average in flight: its work handle, the flat buffer the result
    belongs in, the buffer reduced (a wider copy for bf16/fp16) and where to unpack it."""

    work: Any
    flat: torch.Tensor
    reduced: torch.Tensor
    members: list[torch.Tensor] | None


class _Pending:
    """An average started by :meth:`ProcessGroupCommunicator.start_average`."""

    def __init__(self, stats: CommStats, route: _Route, parts: list[_Part], record: bool, started: float) -> None:
        self._stats = stats
        self._route = route
        self._parts = parts
        self._record = record
        self._started = started
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        self._done = True
        route = self._route
        for i, part in enumerate(self._parts):
            start = time.perf_counter()
            part.work.wait()
            if route.scale is not None:
                part.reduced.mul_(route.scale)  # SUM then scale, as average(): identical bits
            if part.reduced is not part.flat:
                part.flat.copy_(part.reduced)
            if part.flat.is_cuda:
                torch.cuda.synchronize(part.flat.device)
            if part.members is not None:
                unpack(part.flat, part.members)
            if self._record:
                if route.pause:
                    # A slow link delays each collective after the previous one; whatever
                    # of that has passed since the start was hidden by the caller's work.
                    left = self._started + (i + 1) * route.pause - time.perf_counter()
                    if left > 0:
                        time.sleep(left)
                self._stats.record(route.label, part.reduced.nbytes, time.perf_counter() - start)
        self._parts = []


class ProcessGroupCommunicator:
    """Averages and broadcasts over a process group, one collective per dtype.

    ``group`` defaults to the default (world) group. Block scopes get their subgroups
    created once, in :meth:`prepare`, which every rank must call in the same order (the
    algorithms do this when :class:`~localsgd.DataParallel` enters).

    Seconds are wall-clock around each collective; on CUDA the device is synchronized
    first so the figure is the collective's, not the queue's.

    ``delay`` (``{scope label: seconds}``, e.g. ``{"world": 1.0}``) is an injected wait after
    every counted collective of that scope, inside its measured seconds: a slow link or a
    distant site emulated on a fast one (Lin et al. 2020 delay each global synchronisation).
    Every rank waits, so the run's wall time grows by the delay once per collective.
    Uncounted traffic (``record=False``: the broadcast on entering, evaluation) is not
    delayed.
    """

    def __init__(self, group: Any = None, *, delay: Mapping[str, float] | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized; call localsgd.init_distributed() "
                "(or torch.distributed.init_process_group) first"
            )
        self._group = group
        self._rank = dist.get_rank(group)
        self._world_size = dist.get_world_size(group)
        self._blocks: dict[int, Any] = {}
        self._routes: dict[Scope, _Route] = {}
        self._stats = CommStats()
        self._delay = {str(k): float(v) for k, v in (delay or {}).items()}
        bad = {k: v for k, v in self._delay.items() if not v >= 0 or v == float("inf")}
        if bad:
            raise ValueError(f"delay must be finite seconds >= 0 per scope, got {bad}")
        # NCCL averages inside the collective, saving a pass over the buffer.
        self._avg = dist.get_backend(group) == "nccl"
        self._host: ServerHost | None = None
        self._pairs: PairChannels | None = None

    @property
    def group(self) -> Any:
        """The process group it averages over (None: the default world)."""
        return self._group

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def stats(self) -> CommStats:
        return self._stats

    def prepare(self, scope: Scope) -> None:
        if isinstance(scope, Block):
            self._block_group(scope)

    def _block_group(self, scope: Block) -> Any:
        if scope.size in self._blocks:
            return self._blocks[scope.size]
        check_block(scope, self._world_size)
        if self._group is not None and scope.size != self._world_size:
            # new_group is collective over the default world, which a subgroup's ranks alone
            # cannot satisfy.
            raise ValueError("block scopes need the communicator over the default world (group=None)")
        if scope.size == self._world_size:
            mine = self._group
        else:
            # new_group is collective over the whole world: every rank creates every block.
            global_ranks = (
                list(range(self._world_size))
                if self._group is None
                else dist.get_process_group_ranks(self._group)
            )
            mine = None
            for start in range(0, self._world_size, scope.size):
                members = global_ranks[start : start + scope.size]
                pg = dist.new_group(members)
                if start <= self._rank < start + scope.size:
                    mine = pg
        self._blocks[scope.size] = mine
        return mine

    def _route(self, scope: Scope) -> _Route:
        """What an average over ``scope`` needs that no step changes, resolved once."""
        route = self._routes.get(scope)
        if route is None:
            if isinstance(scope, Block):
                group, size = self._block_group(scope), scope.size
            else:
                group, size = self._group, self._world_size
            label = scope.label()
            # NCCL averages inside the collective; gloo has no AVG that is not slower than
            # SUM then one scaling pass (measured in benchmarks/sync_cost.py).
            scale = None if self._avg or size == 1 else 1.0 / size
            route = _Route(group, size, label, scale, self._delay.get(label, 0.0))
            self._routes[scope] = route
        return route

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        scope: Scope = WORLD,
        *,
        record: bool = True,
        codec: WireCodec | None = None,
    ) -> None:
        route = self._route(scope)
        if route.size == 1 or not tensors:
            return
        if codec is not None:
            self._average_encoded(tensors, route, record, codec)
            return
        if len(tensors) == 1:
            flat = tensors[0]
            if flat.dim() == 1 and flat.is_contiguous() and not flat.requires_grad:
                # The sync path: one flat span per dtype, prepared by the caller (see
                # SyncContext.model_tensors). Nothing to group, pack or validate here.
                self._all_reduce_mean(flat, route, record)
                return
        for flat, members in _flats(tensors):
            self._all_reduce_mean(flat, route, record)
            if members is not None:
                unpack(flat, members)

    def _all_reduce_mean(self, flat: torch.Tensor, route: _Route, record: bool) -> None:
        cuda = flat.is_cuda
        if cuda:
            torch.cuda.synchronize(flat.device)
        start = time.perf_counter()
        wide = reduction_dtype(flat.dtype)
        # bf16/fp16: reduced in fp32 and rounded back once (see flat.REDUCED_IN_FP32).
        reduced = flat if wide == flat.dtype else flat.to(wide)
        if route.scale is None:
            dist.all_reduce(reduced, op=dist.ReduceOp.AVG, group=route.group)
        else:
            # SUM then scale: identical bits on every rank.
            dist.all_reduce(reduced, group=route.group)
            reduced.mul_(route.scale)
        if reduced is not flat:
            flat.copy_(reduced)
        if cuda:
            torch.cuda.synchronize(flat.device)
        if record:
            if route.pause:
                time.sleep(route.pause)
            self._stats.record(route.label, reduced.nbytes, time.perf_counter() - start)

    def start_average(
        self, tensors: Sequence[torch.Tensor], scope: Scope = WORLD, *, record: bool = True
    ) -> PendingAverage:
        """The collectives start with ``async_op=True``; the division by K (gloo) and the
        copies back happen in :meth:`_Pending.wait`. An injected delay runs from the start,
        so the work done before ``wait`` hides it as it would hide a slow link."""
        route = self._route(scope)
        parts: list[_Part] = []
        if route.size > 1 and tensors:
            # No device synchronization here: the backend orders its collective stream after
            # the work already queued on the current one, and the caller computes on meanwhile.
            for flat, members in _flats(tensors):
                wide = reduction_dtype(flat.dtype)
                reduced = flat if wide == flat.dtype else flat.to(wide)
                op = dist.ReduceOp.AVG if route.scale is None else dist.ReduceOp.SUM
                work = dist.all_reduce(reduced, op=op, group=route.group, async_op=True)
                parts.append(_Part(work, flat, reduced, members))
        return _Pending(self._stats, route, parts, record, time.perf_counter())

    def _average_encoded(
        self, tensors: Sequence[torch.Tensor], route: _Route, record: bool, codec: WireCodec
    ) -> None:
        """Each dtype group's payload all-gathered, decoded and averaged by every rank."""

        def gather(payload: torch.Tensor) -> list[torch.Tensor]:
            out = [torch.empty_like(payload) for _ in range(route.size)]
            dist.all_gather(out, payload, group=route.group)
            return out

        for slot, (flat, members) in enumerate(_flats(tensors)):
            cuda = flat.is_cuda
            if cuda:
                torch.cuda.synchronize(flat.device)
            start = time.perf_counter()
            coded = codec.exchange(slot, flat, gather)
            if members is not None:
                unpack(flat, members)
            if cuda:
                torch.cuda.synchronize(flat.device)
            if record:
                if route.pause:
                    time.sleep(route.pause)
                seconds = time.perf_counter() - start
                self._stats.record(route.label, coded.nbytes, seconds, gathered=True, coded=coded)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0, *, record: bool = True) -> None:
        if self._world_size == 1 or not tensors:
            return
        global_src = src if self._group is None else dist.get_global_rank(self._group, src)
        pause = self._delay.get("world", 0.0) if record else 0.0
        for flat, members in _flats(tensors):
            cuda = flat.is_cuda
            if cuda:
                torch.cuda.synchronize(flat.device)
            start = time.perf_counter()
            dist.broadcast(flat, src=global_src, group=self._group)
            if cuda:
                torch.cuda.synchronize(flat.device)
            if pause:
                time.sleep(pause)
            seconds = time.perf_counter() - start
            if members is not None:
                unpack(flat, members)
            if record:
                self._stats.record("world", flat.numel() * flat.element_size(), seconds)

    # -- a parameter server (see localsgd.comm.parameter_server) ---------------------------------

    def serve(self, tensors: Sequence[torch.Tensor], server: ServerFactory) -> None:
        """Rank 0 hosts the server (its global model in CPU memory) and a thread per other
        rank; every rank joins its pair group with rank 0. Collective."""
        if self._group is not None:
            raise ValueError("a parameter server needs the communicator over the default world (group=None)")
        if self._rank == 0:
            self._host = ServerHost(server([t.detach().cpu().clone() for t in tensors]))
        self._pairs = PairChannels(self._world_size, self._rank, self._host, tensors)

    def _channels(self) -> PairChannels:
        if self._pairs is None:
            raise RuntimeError("push/pull need a parameter server: call serve() first")
        return self._pairs

    def push(self, tensors: Sequence[torch.Tensor], *, record: bool = True) -> None:
        pairs = self._channels()
        start = time.perf_counter()
        if self._host is not None:
            self._host.exchange(0, tensors, tensors)
        else:
            pairs.request(KIND_PUSH, tensors)
        if record:
            record_exchange(self._stats, tensors, time.perf_counter() - start)

    def pull(self, tensors: Sequence[torch.Tensor], *, final: bool = False, record: bool = True) -> int:
        pairs = self._channels()
        start = time.perf_counter()
        if self._host is not None:
            version = self._host.finish(0, tensors) if final else self._host.pull(tensors)
            if final:
                pairs.join()
        else:
            version = pairs.request(KIND_FINISH if final else KIND_PULL, tensors)
        if record:
            record_pull(self._stats, tensors, time.perf_counter() - start)
        return version
