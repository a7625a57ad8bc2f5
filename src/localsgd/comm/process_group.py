"""The communicator over real ``torch.distributed`` process groups (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from localsgd.comm.base import WORLD, Block, CommStats, Scope, check_block
from localsgd.comm.flat import contiguous_span, group_by_dtype, pack, unpack


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
        self._stats = CommStats()
        self._delay = {str(k): float(v) for k, v in (delay or {}).items()}
        bad = {k: v for k, v in self._delay.items() if not v >= 0 or v == float("inf")}
        if bad:
            raise ValueError(f"delay must be finite seconds >= 0 per scope, got {bad}")
        # NCCL averages inside the collective, saving a pass over the buffer.
        self._avg = dist.get_backend(group) == "nccl"

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

    def _resolve(self, scope: Scope) -> tuple[Any, int]:
        if isinstance(scope, Block):
            return self._block_group(scope), scope.size
        return self._group, self._world_size

    def average(self, tensors: Sequence[torch.Tensor], scope: Scope = WORLD, *, record: bool = True) -> None:
        group, size = self._resolve(scope)
        if size == 1 or not tensors:
            return

        def all_reduce_mean(flat: torch.Tensor) -> None:
            if self._avg:
                dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
            else:
                # SUM then scale: gloo has no AVG. Identical bits on every rank either way.
                dist.all_reduce(flat, group=group)
                flat.mul_(1.0 / size)

        self._per_dtype(tensors, all_reduce_mean, scope.label(), record)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0, *, record: bool = True) -> None:
        if self._world_size == 1 or not tensors:
            return
        global_src = src if self._group is None else dist.get_global_rank(self._group, src)

        def from_src(flat: torch.Tensor) -> None:
            dist.broadcast(flat, src=global_src, group=self._group)

        self._per_dtype(tensors, from_src, "world", record)

    def _per_dtype(
        self,
        tensors: Sequence[torch.Tensor],
        collective: Callable[[torch.Tensor], None],
        label: str,
        record: bool,
    ) -> None:
        """Run ``collective`` once per dtype on a flat buffer: in place when the tensors
        already lie back to back in one storage, else on a packed copy written back."""
        for members in group_by_dtype(tensors).values():
            single = members[0]
            one_flat = len(members) == 1 and single.dim() == 1 and single.is_contiguous()
            flat = single if one_flat else contiguous_span(members)
            packed = flat is None
            if flat is None:
                flat = pack(members)
            pause = self._delay.get(label, 0.0) if record else 0.0
            seconds = self._timed(collective, flat, pause)
            if packed:
                unpack(flat, members)
            if record:
                self._stats.record(label, flat.numel() * flat.element_size(), seconds)

    @staticmethod
    def _timed(collective: Callable[[torch.Tensor], None], flat: torch.Tensor, pause: float = 0.0) -> float:
        cuda = flat.is_cuda
        if cuda:
            torch.cuda.synchronize(flat.device)
        start = time.perf_counter()
        with torch.no_grad():
            collective(flat)
        if cuda:
            torch.cuda.synchronize(flat.device)
        if pause:
            time.sleep(pause)
        return time.perf_counter() - start
