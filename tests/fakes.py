"""A fake communicator for control-flow tests: it records every call and moves no data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import localsgd
from localsgd import algorithms as A
from localsgd.comm.base import WORLD, Block, CommStats, Scope, check_block
from localsgd.comm.flat import group_by_dtype
from scenarios import batch, loss_step, make_model


@dataclass
class Call:
    op: str
    scope: str
    numel: int
    dtypes: list[torch.dtype]


@dataclass
class FakePending:
    comm: FakeCommunicator
    tensors: list[torch.Tensor]
    scope: Scope
    record: bool
    done: bool = False

    def wait(self) -> None:
        if not self.done:
            self.done = True
            self.comm.average(self.tensors, self.scope, record=self.record)


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

    def start_average(
        self, tensors: Sequence[torch.Tensor], scope: Scope = WORLD, *, record: bool = True
    ) -> FakePending:
        """Counted, as the real communicators count it, when waited on."""
        return FakePending(self, list(tensors), scope, record)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0, *, record: bool = True) -> None:
        self.calls.append(Call("broadcast", "world", sum(t.numel() for t in tensors), []))


def run_fake(algo: A.AlgorithmConfig, steps: int, world: int = 4, momentum: float = 0.9):
    """Train ``steps`` steps on rank 0 of a fake world; per step, the scopes communicated."""
    comm = FakeCommunicator(world_size=world)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    per_step = []
    with localsgd.DataParallel(model, opt, algo, comm=comm) as dp:
        assert [c.op for c in comm.calls] == ["broadcast"]
        for step in range(steps):
            n = len(comm.calls)
            loss_step(model, opt, *batch(0, step))
            per_step.append([c.scope for c in comm.calls[n:]])
        stats = dp.stats
    return per_step, stats, comm, model, opt
