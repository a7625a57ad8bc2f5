"""A fake communicator for control-flow tests: it records every call and moves no data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from localsgd.comm.base import WORLD, Block, CommStats, Scope, check_block
from localsgd.comm.flat import group_by_dtype


@dataclass
class Call:
    op: str
    scope: str
    numel: int
    dtypes: list[torch.dtype]


@dataclass
class FakeCommunicator:
    """Pretends to be rank ``rank`` of ``world_size``; averaging leaves tensors unchanged
    (as if every replica held the same values) but is counted like the real thing."""

    world_size: int = 4
    rank: int = 0
    calls: list[Call] = field(default_factory=list)
    stats: CommStats = field(default_factory=CommStats)
    prepared: list[Scope] = field(default_factory=list)

    def prepare(self, scope: Scope) -> None:
        if isinstance(scope, Block):
            check_block(scope, self.world_size)
        self.prepared.append(scope)

    def average(self, tensors: Sequence[torch.Tensor], scope: Scope = WORLD, *, record: bool = True) -> None:
        if isinstance(scope, Block) and scope not in self.prepared:
            raise AssertionError(f"scope {scope} used before prepare()")
        if not tensors:
            return  # as the real communicators: nothing to exchange, no collective
        groups = group_by_dtype(tensors)
        self.calls.append(
            Call("average", scope.label(), sum(t.numel() for t in tensors), [dtype for _, dtype in groups])
        )
        if record:
            for members in groups.values():
                self.stats.record(scope.label(), sum(t.numel() * t.element_size() for t in members), 0.0)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0, *, record: bool = True) -> None:
        self.calls.append(Call("broadcast", "world", sum(t.numel() for t in tensors), []))
