"""Trials batched in the simulated engine: R runs of one model shape, each of K workers,
trained as R independent groups of stacked replicas in one process.

The R·K replicas are stacked along dimension 0, trial r holding rows ``r·K ... r·K+K-1``;
the communicator keeps every collective inside its trial (:class:`SimulatedCommunicator`
with ``groups = R``), so nothing is averaged across trials; :class:`ReplicaSGD` steps all
of them with a learning rate, momentum and weight decay of each replica's own trial. A
search of R trials then costs about one simulation of R·K replicas.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from localsgd import workloads
from localsgd.engines.simulated.communicator import SimulatedCommunicator
from localsgd.engines.simulated.gradients import ReplicaGradients, replica_details
from localsgd.engines.simulated.stacked import StackedModel, retain_freed_memory

log = logging.getLogger(__name__)

STACKED_EVALUATION_ELEMENTS = 2**24
"""The most input elements (64 MiB in fp32) one stacked forward of an evaluation feeds all
its trials together: an evaluation batch times the trials it runs at once. Larger inputs
(images) are evaluated in chunks of trials, so memory stays bounded."""


class ReplicaSGD(torch.optim.Optimizer):
    """SGD over stacked replicas with a learning rate, momentum and weight decay per replica
    (vectors over dimension 0), the update of ``torch.optim.SGD`` row by row:
    d = g + λθ; b ← μb + d (b = d at the first step); d ← d + μb (Nesterov) or b;
    θ ← θ - η d. With μ = 0 this is plain SGD (b = d).

    A param group's ``weight_decay`` is a ``[R]`` tensor; :meth:`set_lr` sets η per replica
    (the group's ``lr`` holds the first replica's, for code that reads one rate).
    """

    def __init__(
        self,
        groups: Sequence[Mapping[str, Any]],
        *,
        momentum: torch.Tensor,
        nesterov: bool,
    ) -> None:
        super().__init__([dict(g) for g in groups], {"lr": 0.0, "weight_decay": None})
        self.momentum = momentum
        self.nesterov = nesterov
        self.lr = torch.zeros_like(momentum)
        # Fixed for the run: decided once, not by a device sync at every step.
        self._use_momentum = bool((momentum != 0).any())
        self._decays = [
            g["weight_decay"] is not None and bool((g["weight_decay"] != 0).any()) for g in self.param_groups
        ]

    def set_lr(self, lr: torch.Tensor) -> None:
        """η for every replica (``[R]``)."""
        self.lr = lr
        for group in self.param_groups:
            group["lr"] = float(lr[0])

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        assert closure is None, "ReplicaSGD takes no closure"
        for group, decays in zip(self.param_groups, self._decays):
            decay = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                shape = (-1,) + (1,) * (p.dim() - 1)
                d = p.grad
                if decays:
                    d = torch.addcmul(d, decay.view(shape), p)
                if self._use_momentum:
                    mu = self.momentum.view(shape)
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        torch.addcmul(d, buf, mu, out=buf)
                    d = torch.addcmul(d, mu, buf) if self.nesterov else buf
                p.addcmul_(self.lr.view(shape), d, value=-1)


class TrialReplicas:
    """R trials of K replicas each, stacked in this process: trial r's replica k reads the
    shard rank k reads in a run of its own (its own seed), starts from its own model,
    and averages with its own trial only. ``models``: each trial's initial model."""

    flat = False

    def __init__(
        self,
        workload: Any,
        models: Sequence[nn.Module],
        replicas: int,
        seeds: Sequence[int],
        device: torch.device,
        delay: Mapping[str, float] | None = None,
        *,
        fused: bool = True,
    ) -> None:
        if len(models) != len(seeds) or not models:
            raise ValueError(f"one model per seed: {len(models)} models, {len(seeds)} seeds")
        self.delay = dict(delay or {})
        self.workload = workload
        self.trials = len(models)
        self.replicas = replicas
        self.seeds = list(seeds)
        self.device = device
        # As a simulated run's replicas do: the stacked step's buffers stay mapped between steps.
        retain_freed_memory()
        self.module = StackedModel(models[0], self.trials * replicas)
        if isinstance(models, SeededModels):
            models.fill(self.module, replicas)
        else:
            with torch.no_grad():
                for r, model in enumerate(models[1:], start=1):
                    _copy_into(self.module, r, replicas, model)
        self.gradients = ReplicaGradients(self.module, workload.loss, fused=fused, groups=self.trials)
        self.comm = SimulatedCommunicator(replicas, groups=self.trials)
        self._evaluators: dict[tuple[int, int], tuple[nn.Module, Any]] = {}
        self.stacked_evaluation: bool | None = None
        """Whether trials are evaluated in one stacked forward (None: not tried yet)."""
        self.stacked_evaluation_reason: str | None = None

    def param_ndim(self, p: torch.Tensor) -> int:
        return self.module.replica_ndim[id(p)]

    def per_replica(self, values: Sequence[float]) -> torch.Tensor:
        """One value per trial -> ``[R·K]``, each repeated for the trial's K replicas."""
        return torch.tensor(list(values), dtype=torch.float32, device=self.device).repeat_interleave(
            self.replicas
        )

    def batches(self, batch_size: int, epoch: int) -> Iterator[Any]:
        streams = [(k, self.replicas, seed) for seed in self.seeds for k in range(self.replicas)]
        return workloads.stacked_train_batches(self.workload, streams, batch_size, epoch, self.device)

    def forward_backward(self, batch: Any) -> torch.Tensor:
        """Set the gradients; return each trial's mean loss (``[R]``)."""
        return self.gradients(batch).mean(1)

    def evaluate(self, trial: int, split: str = "test") -> dict[str, float]:
        # Called under consensus(): every replica of a trial holds its consensus model.
        return workloads.evaluate(self.workload, self.final_model(trial), self.device, split)

    def evaluate_trials(self, trials: Sequence[int], split: str = "test") -> dict[int, dict[str, float]]:
        """:meth:`evaluate` of each of ``trials``, all of them in one stacked forward per
        evaluation batch where the fused path runs the model (the workload's own
        ``evaluate`` is called once per trial on the outputs; see :class:`_StackedForward`).
        The first call checks the first trial against its evaluation alone and evaluates
        one by one from then on when they disagree."""
        trials = list(trials)
        if not trials:
            return {}
        if len(trials) == 1 or self.stacked_evaluation is False or self.gradients.path != "fused":
            return {t: self.evaluate(t, split) for t in trials}
        # Only the span of trials asked for is computed (trials that ended are left out).
        low, high = min(trials), max(trials) + 1
        recorder = _StackedForward(lambda x: self._forward_trials(x, low, high), trials[0] - low)
        try:
            out = {trials[0]: workloads.evaluate(self.workload, recorder, self.device, split)}
        except _NotStackable as exc:
            self._no_stacked_evaluation(str(exc))
            return {t: self.evaluate(t, split) for t in trials}
        if self.stacked_evaluation is None:
            alone = self.evaluate(trials[0], split)
            problem = _disagreement(out[trials[0]], alone)
            if problem is not None:
                self._no_stacked_evaluation(f"the stacked evaluation disagrees with one alone: {problem}")
                return {trials[0]: alone, **{t: self.evaluate(t, split) for t in trials[1:]}}
            self.stacked_evaluation = True
        for t in trials[1:]:
            replay = _Replayed(recorder.calls, t - low)
            try:
                out[t] = workloads.evaluate(self.workload, replay, self.device, split)
                replay.check_done()
            except _NotStackable:
                out[t] = self.evaluate(t, split)  # this evaluation asked for other inputs
        return out

    def _stacked_evaluator(self, start: int, stop: int) -> tuple[nn.Module, Any]:
        """The fused model of trials ``start ... stop - 1``, each by its first replica
        (which holds the trial's consensus model during an evaluation), in evaluation mode;
        it reads the stacked tensors in place, so it is built once."""
        if (start, stop) not in self._evaluators:
            from localsgd.engines.simulated.fused import fused_model

            k, module = self.replicas, self.module
            rows = slice(start * k, stop * k, k)
            params = {n: p.detach()[rows] for n, p in zip(module.param_names, module.stacked)}
            buffers = {n: b[rows] for n, b in zip(module.buffer_names, module.stacked_buffers())}
            model, layout = fused_model(module.module, stop - start, params, buffers)
            self._evaluators[(start, stop)] = (model.eval(), layout)
        return self._evaluators[(start, stop)]

    @torch.no_grad()
    def _forward_trials(self, x: torch.Tensor, low: int, high: int) -> torch.Tensor:
        """The models of trials ``low ... high - 1`` on the input ``x``: ``[high - low,
        *output]``, in chunks of trials whose inputs together hold at most
        :data:`STACKED_EVALUATION_ELEMENTS` elements."""
        chunk = max(1, min(high - low, STACKED_EVALUATION_ELEMENTS // max(x.numel(), 1)))
        outputs = []
        for start in range(low, high, chunk):
            stop = min(start + chunk, high)
            model, layout = self._stacked_evaluator(start, stop)
            out = model(layout.concat(x.unsqueeze(0).expand(stop - start, *x.shape)))
            if not isinstance(out, torch.Tensor):
                raise _NotStackable(f"the model returns {type(out).__name__}, not a tensor")
            outputs.append(layout.split(out))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _no_stacked_evaluation(self, reason: str) -> None:
        self.stacked_evaluation = False
        self.stacked_evaluation_reason = reason
        log.warning("batched trials: evaluating one trial at a time (%s)", reason)

    def final_model(self, trial: int) -> nn.Module:
        return self.module.load_replica_into_template(trial * self.replicas)

    def details(self) -> dict[str, Any]:
        return {
            **replica_details(self.gradients, self.delay),
            "trials_batched": self.trials,
            "stacked_evaluation": bool(self.stacked_evaluation),
            "stacked_evaluation_reason": self.stacked_evaluation_reason,
        }


def _copy_into(module: StackedModel, trial: int, replicas: int, model: nn.Module) -> None:
    """Trial ``trial``'s rows of ``module`` set to ``model``'s tensors."""
    rows = slice(trial * replicas, (trial + 1) * replicas)
    named = dict(model.named_parameters())
    for name, p in zip(module.param_names, module.stacked):
        p.detach()[rows] = named[name].detach()
    named_buffers = dict(model.named_buffers())
    for name, b in zip(module.buffer_names, module.stacked_buffers()):
        b[rows] = named_buffers[name]


class SeededModels(Sequence[nn.Module]):
    """The initial models of trials of ``seeds``: model r is ``make_model(seeds[r])`` built
    with the global generator seeded by ``seeds[r]`` (as a run of its own builds its
    model). Given to :class:`TrialReplicas`, only the first is built; the others are
    initialised straight into the stacked tensors (:meth:`fill`)."""

    def __init__(
        self, make_model: Callable[[int], nn.Module], seeds: Sequence[int], device: torch.device
    ) -> None:
        if not seeds:
            raise ValueError("SeededModels needs at least one seed")
        self.make_model = make_model
        self.seeds = list(seeds)
        self.device = device
        self._built: dict[int, nn.Module] = {}
        self.stacked_init: bool | None = None
        """Whether :meth:`fill` initialised the stacked tensors without building each
        model (None: not filled yet)."""

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, r: Any) -> Any:
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        r = range(len(self))[r]
        if r not in self._built:
            torch.manual_seed(self.seeds[r])  # as a run of its own: the model of its seed
            self._built[r] = self.make_model(self.seeds[r]).to(self.device)
        return self._built[r]

    def fill(self, module: StackedModel, replicas: int) -> None:
        """Set every trial's rows of ``module`` (built from model 0) to its initial model.

        Trial r's values come from replaying the initialisation of model 0's layers --
        each ``reset_parameters()`` in module order, with the generator seeded by
        ``seeds[r]`` -- into one scratch copy, which is checked against the models
        built one by one for the first and the last seed; when they differ (a model
        that draws random numbers otherwise, or seeds its own generator), every model is
        built one by one."""
        template = self[0]
        last = len(self) - 1
        # On the CPU, where the models are built: a CUDA module would draw from CUDA's generator.
        scratch = copy.deepcopy(template).cpu()
        resets = [m for m in scratch.modules() if callable(getattr(m, "reset_parameters", None))]

        def replay(seed: int) -> nn.Module:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                # The CPU generator is the one a model built on the CPU draws from; seeding
                # it alone skips torch.manual_seed's queueing of every other device's seed.
                torch.default_generator.manual_seed(seed)
                for m in resets:
                    m.reset_parameters()
            return scratch

        replayable = bool(resets) and all(
            _same_tensors(replay(self.seeds[r]), self[r]) for r in sorted({0, last})
        )
        self.stacked_init = replayable
        with torch.no_grad():
            for r in range(1, len(self)):
                source = replay(self.seeds[r]) if replayable and r not in self._built else self[r]
                _copy_into(module, r, replicas, source)


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold bitwise the same parameters and buffers, by name."""
    ta = {**dict(a.named_parameters()), **dict(a.named_buffers())}
    tb = {**dict(b.named_parameters()), **dict(b.named_buffers())}
    return ta.keys() == tb.keys() and all(
        ta[n].shape == tb[n].shape and torch.equal(ta[n].detach().to(tb[n].device), tb[n].detach())
        for n in ta
    )


class _NotStackable(Exception):
    """An evaluation the stacked forward cannot serve (see :class:`_StackedForward`)."""


class _StackedForward(nn.Module):
    """A stand-in for trial ``row``'s model during the workload's evaluation: each call
    runs every trial's model on the same input (``forward``: ``x -> [R, *output]``) and
    returns trial ``row``'s output; the calls are kept for :class:`_Replayed`. A call
    with anything but one tensor raises :class:`_NotStackable`."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], row: int) -> None:
        super().__init__()
        self.forward_trials = forward
        self.row = row
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise _NotStackable("the evaluation calls its model with other than one tensor")
        outputs = self.forward_trials(args[0])
        self.calls.append((args[0], outputs))
        return outputs[self.row]


class _Replayed(nn.Module):
    """Trial ``row``'s model for an evaluation that calls it on the inputs a
    :class:`_StackedForward` saw, in the same order: returns its outputs from there."""

    def __init__(self, calls: list[tuple[torch.Tensor, torch.Tensor]], row: int) -> None:
        super().__init__()
        self.calls = calls
        self.row = row
        self.next = 0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.next >= len(self.calls) or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise _NotStackable("the evaluation called its model otherwise")
        x, outputs = self.calls[self.next]
        if not _same_input(args[0], x):
            raise _NotStackable("the evaluation called its model on other inputs")
        self.next += 1
        return outputs[self.row]

    def check_done(self) -> None:
        if self.next != len(self.calls):
            raise _NotStackable("the evaluation called its model fewer times")


def _same_input(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True  # the same view of the same data: an evaluation set sliced again
    return bool(torch.equal(a, b))


def _disagreement(stacked: Mapping[str, float], alone: Mapping[str, float]) -> str | None:
    """None when the metrics agree to float rounding, else which differs."""
    if stacked.keys() != alone.keys():
        return f"metrics {sorted(stacked)} against {sorted(alone)}"
    for name, value in alone.items():
        other = stacked[name]
        if value is None or other is None or not (math.isfinite(value) and math.isfinite(other)):
            if not (
                value == other
                or (value is not None and other is not None and math.isnan(value) and math.isnan(other))
            ):
                return f"{name}: {other} against {value}"
            continue
        if abs(other - value) > 1e-4 * max(abs(value), 1e-3):
            return f"{name}: {other} against {value}"
    return None
