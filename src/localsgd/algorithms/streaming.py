"""Streaming synchronization: the model averaged in fragments, each in flight while training
goes on, and mixed with the local progress when it lands (Douillard et al. 2025,
"Streaming DiLoCo with overlapping communication").

Three fields of every periodic averaging algorithm (local SGD, post-local SGD after its
switch, hierarchical local SGD at its global level, SlowMo, DiLoCo):

- F = ``fragments``: the trainable parameters split, in module order, into F contiguous
  groups balanced by element count. Fragment p syncs every H steps, at its own offset
  t_p = p·H/F within the period (fragment 0 at the period's end, as without fragments,
  so the first sync of fragment p > 0 comes after t_p local steps). Floating-point
  buffers, when averaged, travel with fragment 0. H must be divisible by F.
- τ = ``overlap``: a fragment's average is started at step t and lands at step t + τ;
  the τ steps in between train on while it is in flight (τ ≤ H/F, so it lands before
  the next fragment starts; at τ = H/F it lands at that step, and with F = 1, where the
  next fragment is itself, the next average starts first, on the local model).
- α = ``mixing``: what lands is mixed with the local model as it is then.

In the paper's symbols, for fragment p synced at step t on worker m, with θ_p the
global (anchor) fragment of its last sync:

    Δ_p = (1/M) Σ_m (θ_p − θ_{m,p}^{(t)})                 the averaged outer gradient
    θ̃_p = OuterOpt(θ_p, Δ_p)                              applied when it lands, at t + τ
    θ_{m,p}^{(t+τ)} ← (1 − α)·θ̃_p + α·θ_{m,p}^{(t+τ)}     mixed with the local progress
    θ_p ← θ̃_p                                             the next sync's anchor

For local SGD (no outer optimizer) θ̃_p is the average itself. The average is taken of
the parameters (the pseudo-gradient follows from it exactly as the outer step needs it),
so F = 1, τ = 0, α = 0 is the algorithm without streaming, bit for bit. Each fragment's
sync is one sync in ``dp.stats`` and its collective carries that fragment's bytes.

The snapshot a fragment's average is started on is a copy of its parameters: the
collective works on that copy while the optimizer keeps stepping the parameters. Once its
average has landed, its buffers are reused by that fragment's next snapshot. A
checkpoint taken while an average is in flight waits for it and saves the landed
average with its due step, so a resume applies it at the same step, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from localsgd.algorithms._common import average_model
from localsgd.algorithms.base import SyncContext, load_tensors, require_keys
from localsgd.comm.base import WORLD, PendingAverage, Scope
from localsgd.comm.flat import copies
from localsgd.util.checks import ConfigError, check_float, check_int


@dataclass(frozen=True)
class StreamingOptions:
    """F, τ and α of one algorithm (see the module docstring)."""

    fragments: int = 1
    overlap: int = 0
    mixing: float = 0.0

    @property
    def active(self) -> bool:
        """False at F = 1, τ = 0, α = 0: the algorithm's own (non-streaming) path runs."""
        return self.fragments != 1 or self.overlap != 0 or self.mixing != 0.0


def streaming_options(config: object) -> StreamingOptions:
    """The F, τ and α fields of an algorithm config."""
    return StreamingOptions(
        int(getattr(config, "fragments", 1)), int(getattr(config, "overlap", 0)), float(getattr(config, "mixing", 0.0))
    )


def check_streaming(
    prefix: str,
    fragments: object,
    overlap: object,
    mixing: object,
    period: int,
    period_key: str,
    optimizer_state: object = "local",
) -> StreamingOptions:
    """Validate ``{prefix}.fragments/overlap/mixing`` against the period H they stream
    (``period_key`` names it in messages); return them."""
    check_int(f"{prefix}.fragments", fragments, 1)
    check_int(f"{prefix}.overlap", overlap, 0)
    alpha = check_float(f"{prefix}.mixing", mixing, 0.0, 1.0)
    assert isinstance(fragments, int) and isinstance(overlap, int)
    if period % fragments:
        divisors = [d for d in range(1, period + 1) if period % d == 0]
        raise ConfigError(
            f"{prefix}.fragments = {fragments} must divide {period_key} = {period} "
            f"(fragment i syncs at offset i·H/F); allowed: one of {divisors}"
        )
    if overlap > period // fragments:
        raise ConfigError(
            f"{prefix}.overlap = {overlap} must be <= {period_key}/fragments = {period // fragments} "
            "(a fragment's average lands before the next fragment's starts)"
        )
    options = StreamingOptions(fragments, overlap, alpha)
    if options.active and optimizer_state == "average":
        raise ConfigError(
            f"{prefix}.optimizer_state = 'average' is not streamed; with fragments, overlap or "
            "mixing use 'local' or 'reset'"
        )
    return options


def refuse_compressed(prefix: str, options: StreamingOptions, compression: object) -> None:
    """A compressed sync is not streamed yet: ``{prefix}.compression`` with a codec asks
    for F, τ, α at 1, 0, 0 (a fragment's in-flight average would need its own all-gather)."""
    if options.active and getattr(compression, "enabled", False):
        raise ConfigError(
            f"{prefix}.compression: a compressed sync does not stream yet ({prefix}.fragments/overlap/"
            f"mixing must be 1/0/0, got {options.fragments}/{options.overlap}/{options.mixing:g})"
        )


def streamed_syncs(steps: int, period: int, options: StreamingOptions) -> int:
    """Fragment syncs landed within ``steps`` local steps: fragment p starts at the steps
    t ≡ p·H/F (mod H), t ≥ 1, and lands τ steps later. ``steps // period`` without
    streaming."""
    started_by = steps - options.overlap
    if started_by <= 0:
        return 0
    total = 0
    for offset in fragment_offsets(period, options.fragments):
        total += (started_by + period - offset) // period - (1 if offset == 0 else 0)
    return total


def switched_syncs(steps: int, switch_step: int, period: int, streaming: StreamingOptions | None = None) -> dict[str, int]:
    """Mini-batch SGD (a sync every step) before ``switch_step``, then a sync every
    ``period`` steps counted from the switch (post-local SGD, SlowMo and DiLoCo with t');
    ``streaming`` (:class:`StreamingOptions`): each
    fragment's sync counted, as it lands."""
    before = min(steps, switch_step)
    return {"world": before + streamed_syncs(max(0, steps - switch_step), period, streaming or StreamingOptions())}


def fragment_offsets(period: int, fragments: int) -> list[int]:
    """t_p = p·H/F for each fragment p."""
    return [p * (period // fragments) for p in range(fragments)]


def split_fragments(sizes: Sequence[int], fragments: int, key: str = "fragments") -> list[list[int]]:
    """``fragments`` contiguous groups of the indices of ``sizes`` (element counts, in
    module order), each non-empty, whose totals are as close to equal as the boundaries
    between tensors allow: boundary k sits where the running total is nearest k/F of all."""
    n = len(sizes)
    if fragments > n:
        raise ValueError(f"{key} = {fragments} exceeds the model's {n} trainable parameter tensors")
    running = [0]
    for size in sizes:
        running.append(running[-1] + size)
    total = running[-1]
    bounds = [0]
    for k in range(1, fragments):
        low, high = bounds[-1] + 1, n - (fragments - k)
        target = k * total / fragments
        bounds.append(min(range(low, high + 1), key=lambda b: (abs(running[b] - target), b)))
    bounds.append(n)
    return [list(range(bounds[k], bounds[k + 1])) for k in range(fragments)]


class OuterStep(Protocol):
    """An outer optimizer that steps a fragment from its average
    (:class:`~localsgd.algorithms.outer.OuterMomentum`)."""

    def step(
        self,
        indices: Sequence[int],
        averaged: Mapping[int, torch.Tensor],
        *,
        commit: bool = True,
    ) -> list[tuple[list[int], list[torch.Tensor]]]: ...

    def restart(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class _Landed:
    """The handle of an average that has landed already (restored from a checkpoint)."""

    def wait(self) -> None:
        return None


@dataclass
class InFlight:
    """A fragment's average started at ``started``, landing at ``lands``."""

    fragment: int
    started: int
    lands: int
    snapshot: list[torch.Tensor]
    handle: PendingAverage


class Streamer:
    """The fragment schedule of one averaging level: starts, lands, mixes and counts each
    fragment's sync. ``advance()`` after every local step; ``restart()`` where local steps
    begin (every replica identical); ``finish()`` leaves the consensus model."""

    def __init__(
        self,
        ctx: SyncContext,
        period: int,
        options: StreamingOptions,
        *,
        average_buffers: bool,
        optimizer_state: str,
        outer: OuterStep | None = None,
        scope: Scope = WORLD,
        key: str = "fragments",
    ) -> None:
        self.ctx = ctx
        self.period = period
        self.options = options
        self.average_buffers = average_buffers
        self.optimizer_state = optimizer_state
        self.outer = outer
        self.scope = scope
        # Global element counts (a sharded parameter's, not its local shard's), so every
        # rank draws the same boundaries.
        sizes = [p.numel() for p in ctx.optimizer_params()]
        self.fragments = split_fragments(sizes, options.fragments, key)
        self.offsets = fragment_offsets(period, options.fragments)
        self._members = [
            [ctx.params[i] for i in idx] + (ctx.buffers if p == 0 and average_buffers else [])
            for p, idx in enumerate(self.fragments)
        ]
        self.step = 0
        self.syncs = 0
        self.synced_at = [0] * options.fragments
        """The local step at which each fragment was last left identical on every replica."""
        self.buffers_in_sync = True
        self.in_flight: list[InFlight] = []
        self._spares: list[list[list[torch.Tensor]]] = [[] for _ in self.fragments]
        """Per fragment, snapshots whose average has landed: reused by its next start, so a
        sync allocates no model-sized memory (two at most while F = 1, τ = H)."""

    # -- the schedule -------------------------------------------------------------------------

    def restart(self) -> None:
        """Local steps begin here from identical replicas: the outer optimizer anchors."""
        self.step = 0
        self.synced_at = [0] * len(self.fragments)
        if self.outer is not None:
            self.outer.restart()

    def due(self) -> list[int]:
        """The fragments whose sync starts at the current step."""
        if self.step <= 0:
            return []
        return [p for p, offset in enumerate(self.offsets) if (self.step - offset) % self.period == 0]

    def advance(self) -> None:
        """One local step was taken: land what is due, start what is due (then land it at
        once where τ = 0). Landing first: with τ = H/F a fragment lands at the step its
        successor starts, whose snapshot then holds it. A fragment that starts at the step
        its own previous average lands (F = 1, τ = H) starts first: its snapshot holds the
        H local steps since its last start, which landing first would discard before
        anyone averaged them (the model would never move at α = 0)."""
        self.step += 1
        self.buffers_in_sync = False
        due = self.due()
        self._land_due(keep=set(due))
        for p in due:
            self.start(p)
        self._land_due()

    def _land_due(self, keep: set[int] | None = None) -> None:
        """Land, in the order they started, the averages due by now, except those of the
        fragments in ``keep`` (and any started after them)."""
        while self.in_flight and self.in_flight[0].lands <= self.step:
            if keep and self.in_flight[0].fragment in keep:
                return
            self.land(self.in_flight.pop(0), self.options.mixing)

    @torch.no_grad()
    def start(self, fragment: int) -> None:
        spares = self._spares[fragment]
        if spares:
            copy = spares.pop()
            torch._foreach_copy_(copy, self._members[fragment])
        else:
            copy = copies(self._members[fragment], self.ctx.flat)
        handle = self.ctx.comm.start_average(copy, self.scope)
        self.in_flight.append(InFlight(fragment, self.step, self.step + self.options.overlap, copy, handle))

    @torch.no_grad()
    def land(self, entry: InFlight, mixing: float) -> None:
        """Apply a fragment's average: the outer step on it, then the mix with the local
        model (a copy where α = 0)."""
        entry.handle.wait()
        idx = self.fragments[entry.fragment]
        params = self.ctx.params
        averaged = entry.snapshot
        n = len(idx)
        updates: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        if self.outer is not None:
            by_index = {i: averaged[k] for k, i in enumerate(idx)}
            for ids, x0 in self.outer.step(idx, by_index):
                updates.append(([params[i] for i in ids], x0))
        else:
            updates.append(([params[i] for i in idx], averaged[:n]))
        if len(averaged) > n:
            updates.append((self.ctx.buffers, averaged[n:]))
        for destination, values in updates:
            if mixing == 0.0:
                torch._foreach_copy_(destination, values)
            else:
                # (1 − α)·landed + α·local, out of place: ``values`` may be the anchor.
                torch._foreach_copy_(destination, torch._foreach_lerp(values, destination, mixing))
        if self.optimizer_state == "reset":
            owners = self.ctx.optimizer_params()
            for i in idx:
                self.ctx.optimizer.state.pop(owners[i], None)
        self.syncs += 1
        if mixing == 0.0:
            self.synced_at[entry.fragment] = self.step
            if len(averaged) > n:
                self.buffers_in_sync = True
        # Applied: its buffers serve the fragment's next snapshot.
        self._spares[entry.fragment].append(averaged)

    # -- the consensus ------------------------------------------------------------------------

    def stale(self) -> list[int]:
        """Fragments not identical on every replica at the current step."""
        return [p for p, at in enumerate(self.synced_at) if at != self.step]

    @torch.no_grad()
    def write_consensus(self, *, record: bool) -> None:
        """The model a blocking sync of every stale fragment would produce now (without the
        outer optimizer's state changes); averages in flight are not in it yet."""
        stale = self.stale()
        tensors = [self.ctx.params[i] for p in stale for i in self.fragments[p]]
        if not self.buffers_in_sync:
            tensors += self.ctx.buffers
        if tensors:
            self.ctx.comm.average(tensors, self.scope, record=record)
        if self.outer is not None and stale:
            params = self.ctx.params
            idx = [i for p in stale for i in self.fragments[p]]
            for ids, x0 in self.outer.step(idx, dict(enumerate(params)), commit=False):
                torch._foreach_copy_([params[i] for i in ids], x0)

    def finish(self) -> None:
        """Land what is in flight, then sync every stale fragment at once, unmixed (with
        its outer step): every replica leaves with the same model."""
        while self.in_flight:
            self.land(self.in_flight.pop(0), self.options.mixing)
        for p in self.stale():
            self.start(p)
            self.land(self.in_flight.pop(), 0.0)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        flights = []
        for entry in self.in_flight:
            # The average is waited for here (its bytes counted now, in the saved counters),
            # and saved landed: a resume applies it at its due step without resending it.
            entry.handle.wait()
            entry.handle = _Landed()
            flights.append(
                {
                    "fragment": entry.fragment,
                    "started": entry.started,
                    "lands": entry.lands,
                    "average": [t.detach().clone() for t in entry.snapshot],
                }
            )
        state: dict[str, Any] = {
            "step": self.step,
            "syncs": self.syncs,
            "synced_at": list(self.synced_at),
            "buffers_in_sync": self.buffers_in_sync,
            "fragments": [len(idx) for idx in self.fragments],
            "in_flight": flights,
        }
        if self.outer is not None:
            state["outer"] = self.outer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        require_keys(state, ["step", "syncs", "synced_at", "buffers_in_sync", "fragments", "in_flight"], "streaming")
        if list(state["fragments"]) != [len(idx) for idx in self.fragments]:
            raise ValueError(
                f"streaming state has fragments of {list(state['fragments'])} tensors, this model's are "
                f"{[len(idx) for idx in self.fragments]}"
            )
        self.step = int(state["step"])
        self.syncs = int(state["syncs"])
        self.synced_at = [int(s) for s in state["synced_at"]]
        self.buffers_in_sync = bool(state["buffers_in_sync"])
        self.in_flight = []
        for saved in state["in_flight"]:
            fragment = int(saved["fragment"])
            copy = copies(self._members[fragment], self.ctx.flat)
            load_tensors("in_flight.average", copy, saved["average"])
            self.in_flight.append(InFlight(fragment, int(saved["started"]), int(saved["lands"]), copy, _Landed()))
        if self.outer is not None:
            require_keys(state, ["outer"], "streaming with an outer optimizer")
            self.outer.load_state_dict(state["outer"])


class StreamingSync:
    """Local SGD's synchronizer (and SlowMo's, DiLoCo's, post-local SGD's after the
    switch) with streaming: the drop-in for
    :class:`~localsgd.algorithms.local_sgd.LocalSGDSync` when F, τ or α are set."""

    def __init__(
        self,
        ctx: SyncContext,
        period: int,
        options: StreamingOptions,
        *,
        average_buffers: bool,
        optimizer_state: str,
        outer: OuterStep | None = None,
        key: str = "fragments",
    ) -> None:
        self.ctx = ctx
        self.period = period
        self.average_buffers = average_buffers
        self.streamer = Streamer(
            ctx,
            period,
            options,
            average_buffers=average_buffers,
            optimizer_state=optimizer_state,
            outer=outer,
            key=key,
        )

    @property
    def syncs(self) -> int:
        return self.streamer.syncs

    @property
    def buffers_in_sync(self) -> bool:
        return self.streamer.buffers_in_sync

    @buffers_in_sync.setter
    def buffers_in_sync(self, value: bool) -> None:
        self.streamer.buffers_in_sync = value

    def before_step(self) -> None:
        pass

    def restart(self) -> None:
        self.streamer.restart()

    def after_step(self) -> None:
        self.streamer.advance()

    def write_consensus(self, *, record: bool) -> None:
        self.streamer.write_consensus(record=record)

    def finalize(self) -> None:
        self.streamer.finish()
        average_model(self.ctx, params=False, buffers=not self.streamer.buffers_in_sync, record=True)
        self.streamer.buffers_in_sync = True

    def state_dict(self) -> dict[str, Any]:
        return self.streamer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.streamer.load_state_dict(state)
