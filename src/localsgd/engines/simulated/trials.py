"""Trials batched in the simulated engine: R runs of one model shape, each of K workers,
trained as R independent groups of stacked replicas in one process.

The R·K replicas are stacked along dimension 0, trial r holding rows ``r·K ... r·K+K-1``;
the communicator keeps every collective inside its trial (:class:`SimulatedCommunicator`
with ``groups = R``), so nothing is averaged across trials; :class:`ReplicaSGD` steps all
of them with a learning rate, momentum and weight decay of each replica's own trial. A
search of R trials then costs about one simulation of R·K replicas.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from localsgd import workloads
from localsgd.engines.simulated.communicator import SimulatedCommunicator
from localsgd.engines.simulated.gradients import ReplicaGradients, replica_details
from localsgd.engines.simulated.stacked import StackedModel
from localsgd.util.nest import zip_nests


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
        self.module = StackedModel(models[0], self.trials * replicas)
        with torch.no_grad():
            for r, model in enumerate(models[1:], start=1):
                rows = slice(r * replicas, (r + 1) * replicas)
                named = dict(model.named_parameters())
                for name, p in zip(self.module.param_names, self.module.stacked):
                    p[rows] = named[name].detach()
                named_buffers = dict(model.named_buffers())
                for name, b in zip(self.module.buffer_names, self.module.stacked_buffers()):
                    b[rows] = named_buffers[name]
        self.gradients = ReplicaGradients(self.module, workload.loss, fused=fused, groups=self.trials)
        self.comm = SimulatedCommunicator(replicas, groups=self.trials)

    def param_ndim(self, p: torch.Tensor) -> int:
        return self.module.replica_ndim[id(p)]

    def per_replica(self, values: Sequence[float]) -> torch.Tensor:
        """One value per trial -> ``[R·K]``, each repeated for the trial's K replicas."""
        return torch.tensor(list(values), dtype=torch.float32, device=self.device).repeat_interleave(
            self.replicas
        )

    def batches(self, batch_size: int, epoch: int) -> Iterator[Any]:
        streams = [
            self.workload.train_batches(k, self.replicas, batch_size, epoch, seed, self.device)
            for seed in self.seeds
            for k in range(self.replicas)
        ]
        for group in zip(*streams):
            yield zip_nests(torch.stack, list(group))

    def forward_backward(self, batch: Any) -> torch.Tensor:
        """Set the gradients; return each trial's mean loss (``[R]``)."""
        return self.gradients(batch).mean(1)

    def evaluate(self, trial: int, split: str = "test") -> dict[str, float]:
        # Called under consensus(): every replica of a trial holds its consensus model.
        return workloads.evaluate(self.workload, self.final_model(trial), self.device, split)

    def final_model(self, trial: int) -> nn.Module:
        return self.module.load_replica_into_template(trial * self.replicas)

    def details(self) -> dict[str, Any]:
        return {**replica_details(self.gradients, self.delay), "trials_batched": self.trials}
