"""Asynchrony in the simulated engine: K replicas with their own speeds reach a parameter
server in the order real workers would, and the next worker to finish pushes next.

Time is virtual: worker k takes 1/s_k per step (s_k its speed, ``worker_speeds`` or drawn
from the run's seed). A worker's round (H = ``period`` steps, fewer for its last) runs from
the moment the server returned a model to it; its push happens when the round ends. Events
are processed in time order (ties by worker index: equal speeds give round robin), through
the algorithm's own :class:`~localsgd.algorithms.async_server.ParameterServer`, staleness
bound included: a worker whose push waits (``push_staleness``: until the server admits it;
``ssp``: applied at once, its worker too far ahead of the slowest) starts its next round
when the server lets it go on, at the virtual time of the push that did.

What a round computes depends only on the model the worker received and its own data, so
rounds can be computed any time between that pull and the push. The engine computes them
in *batches*: every worker whose next round is due is stepped at once (one vmap over the
stacked replicas; the others are held still: their rows of parameters, optimizer state and
BatchNorm statistics are put back after each step), then events are processed in time order
until a worker whose round is not computed yet could come first. With equal speeds every
batch holds every worker, and the engine is the lockstep simulation of K processes.

Holding replicas still is exact for SGD (momentum, Nesterov, weight decay): a replica's
update depends on its own row only. With unequal speeds replicas in one step are at
different steps of their own, so their schedule must be constant (checked).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from localsgd.comm.base import Server
from localsgd.engines.base import Capability
from localsgd.util.checks import ConfigError, check_choice, check_float, from_dict


@dataclass(frozen=True)
class SimulatedOptions:
    """``[engine_options]`` of a simulated run: how fast each simulated worker is."""

    worker_speeds: tuple[float, ...] = ()
    """Steps per unit of time of each of the K workers (K values > 0); empty: all 1."""
    speed_spread: float = 0.0
    """σ of log-normal worker speeds drawn from the run's seed (heterogeneous hardware),
    normalised to a mean of 1; 0: all 1. Not together with ``worker_speeds``."""
    steps: str = "equal"
    """How many steps each worker of an asynchronous run takes: ``equal`` (each the run's
    steps, so the slowest finishes last), or ``by_speed`` (in proportion to its speed, the
    same steps in all: every worker trains for the same virtual time, the fast ones more)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "worker_speeds", tuple(self.worker_speeds))
        for i, speed in enumerate(self.worker_speeds):
            check_float(f"engine_options.worker_speeds[{i}]", speed, 0.0, None, low_open=True)
        check_float("engine_options.speed_spread", self.speed_spread, 0.0, 10.0)
        check_choice("engine_options.steps", self.steps, ("equal", "by_speed"))
        if self.worker_speeds and self.speed_spread:
            raise ConfigError("give engine_options.worker_speeds or engine_options.speed_spread, not both")

    @property
    def heterogeneous(self) -> bool:
        return self.speed_spread > 0 or len(set(self.worker_speeds)) > 1

    def requests(self) -> dict[Capability, str]:
        """Unequal speeds ask for worker speeds; ``steps = "by_speed"`` for steps by speed."""
        out: dict[Capability, str] = {}
        if self.worker_speeds and self.heterogeneous:
            out[Capability.WORKER_SPEEDS] = f"engine_options.worker_speeds = {list(self.worker_speeds)}"
        elif self.speed_spread:
            out[Capability.WORKER_SPEEDS] = f"engine_options.speed_spread = {self.speed_spread:g}"
        if self.steps != "equal":
            out[Capability.STEPS_BY_SPEED] = f"engine_options.steps = {self.steps!r}"
        return out

    def speeds(self, workers: int, seed: int) -> list[float]:
        """The K workers' speeds."""
        if self.worker_speeds:
            return [float(s) for s in self.worker_speeds]
        if not self.speed_spread:
            return [1.0] * workers
        g = torch.Generator().manual_seed(seed * 7919 + 104729)
        draws = torch.exp(torch.randn(workers, generator=g, dtype=torch.float64) * self.speed_spread)
        return [float(v) for v in draws / draws.mean()]

    def totals(self, speeds: Sequence[float], total_steps: int) -> list[int]:
        """Each worker's steps: ``total_steps`` each, or (``by_speed``) shares of K times
        that in proportion to the speeds (largest remainders; at least one step each)."""
        k = len(speeds)
        if self.steps == "equal" or len(set(speeds)) == 1:
            return [total_steps] * k
        exact = [total_steps * k * s / sum(speeds) for s in speeds]
        out = [max(1, math.floor(e)) for e in exact]
        for i in sorted(range(k), key=lambda i: (out[i] - exact[i], i))[: max(0, total_steps * k - sum(out))]:
            out[i] += 1
        return out


def simulated_options(raw: Mapping[str, Any] | None, workers: int | None = None) -> SimulatedOptions:
    options = from_dict(SimulatedOptions, dict(raw or {}), "engine_options")
    if workers is not None and options.worker_speeds and len(options.worker_speeds) != workers:
        raise ConfigError(
            f"engine_options.worker_speeds has {len(options.worker_speeds)} values; "
            f"it needs one per worker (workers = {workers})"
        )
    return options


COMPUTE, READY, PENDING, FINISHED = "compute", "ready", "pending", "finished"


class EventLoop:
    """The virtual-time schedule of K workers' rounds and pushes (module docstring).

    ``due`` lists the workers whose next round the engine must compute, with ``lengths``
    their rounds' steps; after computing them, :meth:`advance` processes events until one
    of them could come first (``on_push(k)`` hands worker k's model to the server,
    ``on_pull(k)`` gives it the model the server returned)."""

    def __init__(self, speeds: Sequence[float], period: int, totals: Sequence[int], server: Server) -> None:
        self.speeds = list(speeds)
        self.period = period
        self.totals = list(totals)
        self.server = server
        k = len(self.speeds)
        self.time = 0.0
        self.steps = [0] * k
        self.start = [0.0] * k
        self.lengths = [min(period, total) for total in self.totals]
        self.state = [COMPUTE] * k
        self.finish_at = [math.inf] * k

    @property
    def due(self) -> list[int]:
        return [k for k, s in enumerate(self.state) if s == COMPUTE]

    def _end(self, k: int) -> float:
        return self.start[k] + self.lengths[k] / self.speeds[k]

    def computed(self) -> None:
        """The due rounds have been computed."""
        for k in self.due:
            self.steps[k] += self.lengths[k]
            self.finish_at[k] = self._end(k)
            self.state[k] = READY

    def advance(self, on_push: Callable[[int], object], on_pull: Callable[[int], object]) -> None:
        ready = [(self.finish_at[k], k) for k, s in enumerate(self.state) if s == READY]
        heapq.heapify(ready)
        while ready:
            due = [(self._end(j), j) for j in self.due]
            if due and ready[0] > min(due):
                return  # a round not computed yet ends first
            self.time, k = heapq.heappop(ready)
            self.state[k] = PENDING
            on_push(k)
            self._release(on_pull)
        if not self.due and any(s == PENDING for s in self.state):
            waiting = [k for k, s in enumerate(self.state) if s == PENDING]
            raise RuntimeError(f"simulated engine: workers {waiting} wait for the server and nobody can push")

    def _release(self, on_pull: Callable[[int], object]) -> None:
        """Every waiting worker the server lets go on pulls now and starts its next round
        (or finishes); repeated, since a finish can let workers of any index go on."""
        released = True
        while released:
            released = False
            for j, s in enumerate(self.state):
                if s == PENDING and self.server.ready(j):
                    released = True
                    on_pull(j)
                    left = self.totals[j] - self.steps[j]
                    if left == 0:
                        self.state[j] = FINISHED
                        self.server.finish(j)
                    else:
                        self.state[j] = COMPUTE
                        self.start[j] = self.time
                        self.lengths[j] = min(self.period, left)

    @property
    def finished(self) -> bool:
        return all(s == FINISHED for s in self.state)


@dataclass
class Batch:
    """One batch of the schedule: who computes, for how many steps of the H."""

    lengths: dict[int, int]


class NullServer:
    """The server's bookkeeping without a model, to plan the schedule in advance (the order
    of events depends on the speeds and the server's rules only, never on the values)."""

    def __init__(self, server: Any) -> None:
        from localsgd.algorithms.async_server import ParameterServer

        self.inner = ParameterServer([], server.workers, server.options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def plan(speeds: Sequence[float], period: int, totals: Sequence[int], server: Any) -> list[Batch]:
    """The batches a run of these speeds and per-worker steps takes (see :class:`EventLoop`)."""
    loop = EventLoop(speeds, period, totals, NullServer(server))
    batches = []
    while not loop.finished:
        due = loop.due
        if not due:
            raise RuntimeError("simulated engine: the schedule stalled")
        batches.append(Batch({k: loop.lengths[k] for k in due}))
        loop.computed()
        loop.advance(lambda k: loop.server.push(k, []), lambda k: None)
    return batches


class Asynchrony:
    """A simulated run of an asynchronous algorithm: the schedule, which replicas step at
    each step of the training loop, each replica's own stream of batches, and the pushes in
    event order. Built when training begins (the server exists by then)."""

    def __init__(
        self,
        server: Server,
        speeds: Sequence[float],
        period: int,
        totals: Sequence[int],
        streams: list[Iterator[Any]],
    ) -> None:
        self.server = server
        self.period = period
        self.batches = plan(speeds, period, totals, server)
        self.loop = EventLoop(speeds, period, totals, server)
        self.streams = streams
        self.filler: Any = None
        self.iteration = 0
        self.done = [0] * len(speeds)
        """Steps each replica has taken so far."""
        self.progress: list[float] = [0.0]
        """Mean steps per replica after each step of the training loop."""
        total = 0
        for batch in self.batches:
            for i in range(period):
                total += sum(1 for n in batch.lengths.values() if n > i)
                self.progress.append(total / len(speeds))
        # Replicas are held still at a step where some worker computes nothing: it is not in
        # the batch, or its round (its last) is shorter than H.
        self.masking = any(len(b.lengths) < len(speeds) or min(b.lengths.values()) < period for b in self.batches)
        self.mixed_steps = len(set(speeds)) > 1

    @property
    def iterations(self) -> int:
        return len(self.batches) * self.period

    def active(self) -> list[int]:
        """The replicas that take a step at this step of the training loop."""
        batch = self.batches[min(self.iteration // self.period, len(self.batches) - 1)]
        i = self.iteration % self.period
        return [k for k, n in batch.lengths.items() if n > i]

    def next_batches(self) -> list[Any]:
        """Each active replica's next batch from its own stream; held replicas get a copy of
        an active one's (their results are put back)."""
        active = self.active()
        picked = {k: next(self.streams[k]) for k in active}
        if active:
            self.filler = picked[active[0]]
        # (A step where every replica is held: the tail of a batch of short last rounds.)
        return [picked.get(k, self.filler) for k in range(len(self.streams))]

    def stepped(self) -> None:
        for k in self.active():
            self.done[k] += 1
        self.iteration += 1

    def push(self, rows: Callable[[int], list[torch.Tensor]]) -> int:
        """The push of a batch: process events in time order; returns the pushes applied."""
        before = len(getattr(self.server, "log", []))
        self.loop.computed()
        self.loop.advance(lambda k: self.server.push(k, rows(k)), lambda k: self.server.model(rows(k), k))
        return len(getattr(self.server, "log", [])) - before

    def virtual_time(self) -> float:
        return self.loop.time
