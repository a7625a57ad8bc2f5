"""The communicator of a world of one process: nothing to exchange, nothing counted."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from localsgd.comm.base import WORLD, Block, CommStats, Scope, check_block


class SoloCommunicator:
    """Every collective is the identity when there is a single replica."""

    def __init__(self) -> None:
        self._stats = CommStats()

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

    def average(self, tensors: Sequence[torch.Tensor], scope: Scope = WORLD, *, record: bool = True) -> None:
        return None

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0, *, record: bool = True) -> None:
        return None
