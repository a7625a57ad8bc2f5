"""The communicator protocol: the narrow waist between algorithms and engines.

Algorithms only ever call :meth:`Communicator.average` (or its non-blocking half,
:meth:`Communicator.start_average`, whose :class:`PendingAverage` they ``wait`` on) and
:meth:`Communicator.broadcast`, and asynchronous ones :meth:`~Communicator.serve`, :meth:`~Communicator.push` and
:meth:`~Communicator.pull` (a parameter server). An engine supplies the implementation:
real process groups (:class:`~localsgd.comm.process_group.ProcessGroupCommunicator`) or the
simulated engine's (:class:`~localsgd.engines.simulated.engine.SimulatedCommunicator`), which holds
every replica stacked in one process. Both count the same things.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union, runtime_checkable

import torch


@dataclass(frozen=True)
class World:
    """Every rank of the communicator's group."""

    def label(self) -> str:
        return "world"


@dataclass(frozen=True)
class Block:
    """Blocks of ``size`` consecutive ranks (G in hierarchical local SGD): ranks
    ``[0, G)``, ``[G, 2G)``, ... average among themselves."""

    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"block size must be an integer >= 1, got {self.size!r}")

    def label(self) -> str:
        return f"block{self.size}"


Scope = Union[World, Block]  # noqa: UP007 - a runtime alias, kept valid on Python 3.10
WORLD = World()


def check_block(scope: Block, world_size: int) -> None:
    """Raise ``ValueError`` unless ``scope.size`` divides ``world_size``."""
    if world_size % scope.size != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"block_size={scope.size} does not divide the world size {world_size}; allowed: one of {divisors}"
        )


@dataclass
class CommStats:
    """What a communicator has done: collectives issued, payload bytes, seconds spent.

    ``bytes`` is the payload handed to each collective (numel x element size), not the
    traffic a particular collective algorithm puts on the wire; the cost model turns one
    into the other. A compressed average is an all-gather of each rank's payload, not an
    all-reduce: its scope's entry also counts it under ``gathers`` and ``gathered_bytes``
    (keys present only once one happened), so the cost model prices the two apart.
    """

    collectives: int = 0
    bytes: int = 0
    seconds: float = 0.0
    by_scope: dict[str, dict[str, float]] = field(default_factory=dict)

    def record(
        self, scope_label: str, nbytes: int, seconds: float, *, gathered: bool = False, coded: Exchanged | None = None
    ) -> None:
        self.collectives += 1
        self.bytes += nbytes
        self.seconds += seconds
        entry = self.by_scope.get(scope_label)
        if entry is None:  # not setdefault: no throwaway dict on every collective
            entry = self.by_scope[scope_label] = {"collectives": 0, "bytes": 0, "seconds": 0.0}
        entry["collectives"] += 1
        entry["bytes"] += nbytes
        entry["seconds"] += seconds
        if gathered:
            entry["gathers"] = entry.get("gathers", 0) + 1
            entry["gathered_bytes"] = entry.get("gathered_bytes", 0) + nbytes
        if coded is not None:
            entry["encoded"] = entry.get("encoded", 0) + coded.encoded
            entry["decoded"] = entry.get("decoded", 0) + coded.decoded
            entry["codec_seconds"] = entry.get("codec_seconds", 0.0) + coded.codec_seconds

    def as_dict(self) -> dict[str, object]:
        return {
            "collectives": self.collectives,
            "bytes": self.bytes,
            "comm_seconds": self.seconds,
            "by_scope": {k: dict(v) for k, v in self.by_scope.items()},
        }


PUSH = "push"
PULL = "pull"
"""The scope labels of a parameter server's transfers in :class:`CommStats`: one of each
per exchange (a worker's model up, the global model down), each of one model's bytes."""


class Server(Protocol):
    """A parameter server's state as a communicator hosts it (the algorithm's rules; see
    :class:`localsgd.algorithms.async_server.ParameterServer`). Not thread-safe: the host
    serialises calls. Non-blocking: ``push``/``finish`` register, ``ready`` tells when done."""

    def push(self, worker: int, model: Sequence[torch.Tensor]) -> None: ...

    def finish(self, worker: int) -> None: ...

    def lose(self, worker: int) -> None: ...

    def ready(self, worker: int) -> bool: ...

    def finished(self) -> bool: ...

    def model(self, out: Sequence[torch.Tensor], worker: int | None = None) -> int: ...


ServerFactory = Callable[[list[torch.Tensor]], Server]


class PendingAverage(Protocol):
    """An average in flight (:meth:`Communicator.start_average`). Until :meth:`wait`
    returns, the tensors it was started on belong to the communicator: their contents are
    undefined and nothing may write to them."""

    def wait(self) -> None:
        """Block until the average has landed in the tensors. Its collectives and bytes are
        counted here, as :meth:`Communicator.average` counts them, and its seconds are the
        time spent waiting (what the caller did not hide behind its own work). A second
        call returns at once."""
        ...
"""Builds the server from the initial global model (one replica's tensors)."""


@dataclass(frozen=True)
class Exchanged:
    """What one compressed average cost one worker (:meth:`WireCodec.exchange`)."""

    nbytes: int
    """The payload this worker sent (scales and indices included)."""
    encoded: int
    """Values it encoded (its own, once)."""
    decoded: int
    """Values it decoded: each member's payload, and its own once more for error feedback."""
    codec_seconds: float
    """Seconds it spent encoding, decoding and averaging (everything but the all-gather)."""


class WireCodec(Protocol):
    """How an average is compressed (:class:`localsgd.comm.codecs.WireState`): the
    communicator hands it each dtype group's flat values and its own all-gather."""

    def exchange(
        self, slot: int, flat: torch.Tensor, gather: Callable[[torch.Tensor], list[torch.Tensor]]
    ) -> Exchanged:
        """Replace ``flat`` with the scope's mean of what its members sent; return what it
        cost this rank (``gather`` takes one payload, returns every member's in rank order)."""
        ...


@runtime_checkable
class Communicator(Protocol):
    """What an algorithm may ask of the engine.

    ``average`` works in place and issues one collective per dtype among ``tensors``
    (never one per tensor). ``record=False`` keeps the call out of :attr:`stats`, for
    bookkeeping traffic such as evaluating the consensus model. ``codec``: the values
    cross the wire compressed, as an all-gather of each member's payload that every member
    decodes and averages in rank order (see :mod:`localsgd.comm.codecs`); counted bytes
    are the payload's.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def stats(self) -> CommStats: ...

    def prepare(self, scope: Scope) -> None:
        """Validate ``scope`` against the world and create what it needs (subgroups),
        once, collectively. Raises ``ValueError`` for a block size that does not divide
        the world."""
        ...

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        scope: Scope = WORLD,
        *,
        record: bool = True,
        codec: WireCodec | None = None,
    ) -> None: ...

    def start_average(
        self, tensors: Sequence[torch.Tensor], scope: Scope = WORLD, *, record: bool = True
    ) -> PendingAverage:
        """:meth:`average` without blocking: the collectives start now and the averages
        land in ``tensors`` when the returned handle's ``wait()`` returns. Every rank
        starts, and waits on, the same averages in the same order."""
        ...

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0, *, record: bool = True) -> None: ...

    def serve(self, tensors: Sequence[torch.Tensor], server: ServerFactory) -> None:
        """Host a parameter server whose initial model is ``tensors`` (the same on every
        worker): ``server(initial)`` is built once, where this communicator keeps it (rank
        0's process, the simulated engine). Collective: every worker calls it, once, first."""
        ...

    def push(self, tensors: Sequence[torch.Tensor], *, record: bool = True) -> None:
        """Send this worker's model (``tensors``) to the server and, once the server has
        applied it, overwrite ``tensors`` with the global model it produced (a push and a
        pull in one exchange, so no other update can come between them)."""
        ...

    def pull(self, tensors: Sequence[torch.Tensor], *, final: bool = False, record: bool = True) -> int:
        """Overwrite ``tensors`` with the current global model; return its version.
        ``final``: this worker is done pushing; wait until every worker is done (or lost)
        and return the final global model."""
        ...
