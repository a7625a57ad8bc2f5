"""The parameter server of asynchronous (local) SGD: the global model, the order in which
workers' pushes are applied, the staleness bound, and the outer update.

Pure tensor math and bookkeeping, no transport and no locking: a communicator hosts it
(:class:`~localsgd.comm.parameter_server.ServerHost` adds threads and waiting; the simulated
engine drives it from its event loop). Every engine applies pushes through this one class,
so equal push orders give bit-identical models.

Versions and staleness: the global model's version V counts the updates applied so far. A
worker's base b is the version of the model it last received; a push applied at version V
has staleness τ = V − b (updates it did not see). A worker's clock c counts its applied
pushes (its completed rounds of H local steps).

Staleness-scaled pushes (``staleness_lr``) multiply a push's change by c(τ): ``inverse`` is
Zhang et al. 2016 ("Staleness-aware Async-SGD for Distributed Deep Learning"): the learning
rate of a gradient of staleness τ is η/τ for τ ≥ 1 and η for τ = 0; ``inverse_plus_one``
is the smoother 1/(1 + τ), which also halves a push of staleness 1.

Two bounds s on staleness (``staleness_mode``), both deadlock-free (the slowest worker never
waits, and finished and lost workers stop bounding the others):

- ``ssp``, stale synchronous parallel (Ho et al. 2013, "More Effective Distributed ML via a
  Stale Synchronous Parallel Parameter Server"): every push is applied when it arrives; a
  worker whose clock, after its push, is more than s ahead of the slowest worker's waits
  (it is not handed a model) until the slowest catches up: a worker at clock c starts its
  next round only when min_j c_j ≥ c − s over the workers that may still push. The bound
  is on clocks, not on τ: during one round of a worker at clock c, each other worker may
  push its rounds c − s to c + s, so τ ≤ (2s + 1)(K − 1). The model a worker receives when
  it goes on is the global model then, holding every push of every worker's rounds before
  c − s (Ho et al.'s read guarantee) and whatever newer ones were applied.
- ``push_staleness``: τ ≤ s for every applied push. A push that would break this is held
  (its worker waits); when the laggards (the workers of the oldest base) have all pushed,
  their pushes are applied together as one update (their mean). With s = 0 every round is
  one update of all K pushes, each with τ = 0: synchronous local SGD. Not SSP: SSP applies
  every push by itself and bounds clocks; this bounds the versions a push missed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ORDERS = ("arrival", "round_robin")
STALENESS_MODES = ("push_staleness", "ssp")
STALENESS_LR = {
    "none": lambda tau: 1.0,
    "inverse": lambda tau: 1.0 / tau if tau >= 1 else 1.0,
    "inverse_plus_one": lambda tau: 1.0 / (1 + tau),
}
"""c(τ), the factor of a push of staleness τ, by ``staleness_lr`` (module docstring)."""


@dataclass(frozen=True)
class ServerOptions:
    """The server's share of :class:`~localsgd.algorithms.AsyncLocalSGD`'s fields."""

    max_staleness: int | None = None
    staleness_mode: str = "push_staleness"
    staleness_lr: str = "none"
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    nesterov_delay: int = 1
    order: str = "arrival"
    period: int = 1
    """H: the workers' local steps between pushes (for engines that schedule the pushes)."""

    def __post_init__(self) -> None:
        # The user-facing checks are AsyncLocalSGD's; these guard direct construction.
        if self.staleness_mode not in STALENESS_MODES:
            raise ValueError(
                f"staleness_mode must be one of {list(STALENESS_MODES)}, got {self.staleness_mode!r}"
            )
        if self.staleness_lr not in STALENESS_LR:
            raise ValueError(f"staleness_lr must be one of {list(STALENESS_LR)}, got {self.staleness_lr!r}")

    @property
    def ssp(self) -> bool:
        return self.max_staleness is not None and self.staleness_mode == "ssp"


@dataclass(frozen=True)
class Applied:
    """One push as applied: who, from which base, at which version, with which staleness,
    in a group of how many pushes (one update); the worker's clock c (its pushes before
    this one: the push ends its round c) and its gap c − min_j c_j to the slowest worker
    that may still push (SSP bounds it by s)."""

    worker: int
    base: int
    version: int
    staleness: int
    group: int
    clock: int
    gap: int


class OuterStep:
    """The server's update θ ← θ − η·d from the pseudo-gradient g = base − x of an update.

    μ = 0: d = g (plain; for η = 1 and unscaled pushes the worker's model is taken as is,
    plus what others changed since its base). μ > 0 with delay N (Liu et al. 2024,
    "Asynchronous Local-SGD Training for Language Modeling", Algorithm 3, delayed
    Nesterov): g is accumulated; every N-th update m ← μ·m + ḡ (ḡ the mean of the N
    accumulated) and d = g/N + μ·m; in between d = g/N (no momentum). N = 1 is Nesterov
    momentum on every update: m ← μ·m + g, d = g + μ·m.
    """

    def __init__(self, model: Sequence[torch.Tensor], lr: float, momentum: float, delay: int) -> None:
        self.lr = lr
        self.momentum = momentum
        self.delay = delay
        self.count = 0
        self.buffer = [torch.zeros_like(t) for t in model] if momentum > 0 else []
        self.accumulated = [torch.zeros_like(t) for t in model] if momentum > 0 and delay > 1 else []

    @torch.no_grad()
    def apply(
        self,
        model: list[torch.Tensor],
        base: Sequence[torch.Tensor],
        pushed: Sequence[Sequence[torch.Tensor]],
        scales: Sequence[float],
    ) -> None:
        """Update ``model`` in place from the pushed models (one update: their mean)."""
        n = len(pushed)
        if not model:
            return  # bookkeeping only (a schedule planned without a model)
        if self.momentum == 0 and self.lr == 1.0 and all(c == 1.0 for c in scales):
            # θ + (x̄ − base) written as x̄ + (θ − base): when nobody else updated the model
            # since this base, θ − base is exactly 0 and the worker's model is kept bit for
            # bit (one worker is plain SGD exactly).
            mean = list(pushed[0]) if n == 1 else _mean(pushed)
            for t, xm, b in zip(model, mean, base):
                t.sub_(b).add_(xm)  # (θ − base) + x̄: the same rounding as x̄ + (θ − base), in place
            return
        # g = mean_k c_k (base − x_k)
        grad = [torch.zeros_like(t) for t in model]
        for one_push, c in zip(pushed, scales):
            for g, xi, b in zip(grad, one_push, base):
                g.add_(b - xi, alpha=c / n)
        if self.momentum == 0:
            torch._foreach_add_(model, grad, alpha=-self.lr)
            return
        self.count += 1
        if self.delay == 1:
            torch._foreach_mul_(self.buffer, self.momentum)
            torch._foreach_add_(self.buffer, grad)
            torch._foreach_add_(model, grad, alpha=-self.lr)
            torch._foreach_add_(model, self.buffer, alpha=-self.lr * self.momentum)
            return
        torch._foreach_add_(self.accumulated, grad)
        torch._foreach_add_(model, grad, alpha=-self.lr / self.delay)
        if self.count % self.delay == 0:
            torch._foreach_mul_(self.buffer, self.momentum)
            torch._foreach_add_(self.buffer, self.accumulated, alpha=1.0 / self.delay)
            torch._foreach_add_(model, self.buffer, alpha=-self.lr * self.momentum)
            torch._foreach_zero_(self.accumulated)


def _mean(pushed: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(list(parts)).mean(0) for parts in zip(*pushed)]


class ParameterServer:
    """The global model of K workers and the rules that update it (module docstring).

    ``push(k, x)`` hands over worker k's model after its local steps; the push waits in
    ``pending`` until it is admissible, then is applied (alone, or with the laggards'
    group); under SSP k then waits in ``blocked`` while it is too far ahead. ``ready(k)``
    tells whether k may go on after its last push (or finish); ``model(out, k)`` copies
    the model k continues from.
    ``order = "round_robin"`` admits pushes strictly in the cyclic order of the workers,
    whatever order they arrive in: a deterministic schedule for tests.
    """

    def __init__(self, initial: Sequence[torch.Tensor], workers: int, options: ServerOptions) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.options = options
        self.workers = workers
        self.version = 0
        self.global_model = [t.detach().clone() for t in initial]
        self.snapshots: dict[int, list[torch.Tensor]] = {0: [t.clone() for t in self.global_model]}
        self.base = [0] * workers
        self.active = set(range(workers))
        self.done: set[int] = set()
        self.lost: dict[int, int] = {}
        """Workers lost, with the version at which they were."""
        self.pending: dict[int, tuple[int, list[torch.Tensor] | None]] = {}
        """Worker -> (arrival number, its pushed model; None for a finish)."""
        self.processed = [True] * workers
        self.clock = [0] * workers
        """c_k: worker k's applied pushes."""
        self.blocked: set[int] = set()
        """SSP: workers whose push was applied and that wait for the slowest to catch up."""
        self.arrivals = 0
        self.turn = 0
        self.log: list[Applied] = []
        self.outer = OuterStep(
            self.global_model, options.outer_lr, options.outer_momentum, options.nesterov_delay
        )

    # -- what workers do -----------------------------------------------------------------

    def push(self, worker: int, model: Sequence[torch.Tensor]) -> None:
        self._arrive(worker, [t.detach().to(g.device, copy=True) for t, g in zip(model, self.global_model)])

    def finish(self, worker: int) -> None:
        """Worker has no more pushes (again: nothing happens)."""
        if worker in self.done or worker in self.lost or (worker in self.pending and self.pending[worker][1] is None):
            return
        self._arrive(worker, None)

    def lose(self, worker: int) -> None:
        """Worker is gone (its process died): it no longer bounds anyone's staleness."""
        if worker in self.active:
            self.active.discard(worker)
            self.lost[worker] = self.version
            self.pending.pop(worker, None)
            self.blocked.discard(worker)
            self.processed[worker] = True
            self._forget_unused()
            if self.options.order == "round_robin" and self.turn == worker:
                self._advance({worker})
            self._admit()

    def ready(self, worker: int) -> bool:
        return self.processed[worker]

    def finished(self) -> bool:
        """Every worker finished or was lost."""
        return not self.active

    def model(self, out: Sequence[torch.Tensor], worker: int | None = None) -> int:
        """Copy the model worker's last push produced (None: the current global model)
        into ``out``; return its version."""
        version = self.version if worker is None else self.base[worker]
        source = self.global_model if worker is None else self.snapshots[version]
        if source:
            with torch.no_grad():
                torch._foreach_copy_(list(out), source)
        return version

    # -- what the record shows ---------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Updates, the staleness distribution of the applied pushes, lost workers."""
        staleness = [a.staleness for a in self.log]
        histogram = Counter(staleness)
        return {
            "updates": self.version,
            "pushes": len(self.log),
            "staleness": {str(k): histogram[k] for k in sorted(histogram)},
            "max_staleness_seen": max(staleness, default=0),
            "mean_staleness": sum(staleness) / len(staleness) if staleness else 0.0,
            "max_clock_gap_seen": max((a.gap for a in self.log), default=0),
            "pushes_per_worker": [sum(1 for a in self.log if a.worker == k) for k in range(self.workers)],
            "lost_workers": {str(k): v for k, v in sorted(self.lost.items())},
        }

    # -- the rules -------------------------------------------------------------------------

    def _arrive(self, worker: int, model: list[torch.Tensor] | None) -> None:
        if worker not in self.active:
            raise ValueError(f"worker {worker} is not active (finished or lost)")
        if worker in self.pending:
            raise ValueError(f"worker {worker} pushed again before its last push was applied")
        self.pending[worker] = (self.arrivals, model)
        self.arrivals += 1
        self.processed[worker] = False
        self._admit()

    def _candidates(self) -> list[int]:
        if self.options.order == "round_robin":
            return [self.turn] if self.turn in self.pending else []
        return sorted(self.pending, key=lambda k: self.pending[k][0])

    def _admit(self) -> None:
        progressed = True
        while progressed and self.pending:
            progressed = False
            for k in self._candidates():
                if self.pending[k][1] is None:
                    self._retire(k)
                    progressed = True
                    break
                group = self._group(k)
                if group is not None:
                    self._apply(group)
                    progressed = True
                    break
        self._release()

    def _bounding(self) -> list[int]:
        """Workers that may still push (active, no finish waiting)."""
        return [j for j in self.active if not (j in self.pending and self.pending[j][1] is None)]

    def _group(self, k: int) -> list[int] | None:
        """The pushes to apply with k's now (k alone, or the laggards' group), or None if
        k must wait."""
        s = self.options.max_staleness
        if s is None or self.options.ssp:
            return [k]
        bounding = self._bounding()
        others = [self.base[j] for j in bounding if j != k]
        if not others or self.version + 1 - min(others) <= s:
            return [k]
        oldest = min(self.base[j] for j in bounding)
        if self.base[k] != oldest:
            return None
        group = sorted(j for j in bounding if self.base[j] == oldest)
        if any(j not in self.pending for j in group):
            return None
        rest = [self.base[j] for j in bounding if j not in group]
        assert not rest or self.version + 1 - min(rest) <= s, (self.version, rest, s)
        return group

    def _apply(self, group: list[int]) -> None:
        base_version = self.base[group[0]]
        assert all(self.base[k] == base_version for k in group), group
        staleness = self.version - base_version
        bound = self.options.max_staleness
        ssp = self.options.ssp
        assert bound is None or ssp or staleness <= bound, (staleness, bound)
        slowest = min(self.clock[j] for j in self._bounding())
        gaps = {k: self.clock[k] - slowest for k in group}
        # Each of these rounds began with its worker at most s clocks ahead, and the slowest
        # clock only grows.
        assert bound is None or not ssp or max(gaps.values()) <= bound, (gaps, bound)
        scale = STALENESS_LR[self.options.staleness_lr](staleness)
        pushed = []
        for k in group:
            model = self.pending.pop(k)[1]
            assert model is not None
            pushed.append(model)
        self.outer.apply(self.global_model, self.snapshots[base_version], pushed, [scale] * len(group))
        self.version += 1
        self.snapshots[self.version] = [t.clone() for t in self.global_model]
        for k in group:
            self.log.append(
                Applied(k, base_version, self.version - 1, staleness, len(group), self.clock[k], gaps[k])
            )
            self.clock[k] += 1
            self.base[k] = self.version
            if ssp:
                self.blocked.add(k)  # _release decides whether it goes on
            else:
                self.processed[k] = True
        self._forget_unused()
        if self.options.order == "round_robin":
            self._advance(set(group))

    def _release(self) -> None:
        """SSP: let every blocked worker at most s clocks ahead of the slowest go on, from
        the global model as it is now."""
        if not self.blocked:
            return
        s = self.options.max_staleness
        assert s is not None
        # Blocked workers may still push, so the minimum is over a non-empty set, and the
        # slowest worker itself is never held: no set of waiting workers can deadlock.
        slowest = min(self.clock[j] for j in self._bounding())
        for k in sorted(self.blocked):
            if self.clock[k] - slowest <= s:
                self.blocked.discard(k)
                self.base[k] = self.version
                self.processed[k] = True

    def _retire(self, k: int) -> None:
        self.pending.pop(k)
        self.active.discard(k)
        self.done.add(k)
        self.processed[k] = True
        self._forget_unused()
        if self.options.order == "round_robin":
            self._advance({k})

    def _advance(self, served: set[int]) -> None:
        """Round robin: the turn passes to the next active worker after the one that held
        it, skipping those just served."""
        if not self.active:
            return
        for step in range(1, self.workers + 1):
            candidate = (self.turn + step) % self.workers
            if candidate in self.active and candidate not in served:
                self.turn = candidate
                return
        self.turn = min(self.active)

    def _forget_unused(self) -> None:
        keep = {self.base[j] for j in self.active} | {self.version}
        for version in [v for v in self.snapshots if v not in keep]:
            del self.snapshots[version]
