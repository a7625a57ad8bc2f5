"""Per-replica losses and gradients of a stacked model, all replicas at once: fused stacked
layers (:mod:`localsgd.engines.simulated.fused`), ``vmap(grad(...))`` over
``torch.func.functional_call``, or a loop; checked against each other on the first batch."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from localsgd.engines.simulated.stacked import LossFn, ModelWithLoss, StackedModel, explicit_batchnorm
from localsgd.util.nest import map_nest

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

class ReplicaGradients:
    """Per-replica losses and gradients of a :class:`StackedModel`, all replicas at once.

    Three paths, the first that fits: ``fused`` (:mod:`localsgd.engines.simulated.fused`: the model
    run once on the concatenated batch with stacked layers, for models built of common
    layers; checked once against the reference on the first batch), ``vmap``
    (``vmap(grad_and_value(...))`` over ``functional_call``, any model ``vmap`` handles),
    ``loop`` (the same functional code replica by replica). BatchNorm running statistics
    are updated in place, per replica. A batch is any nest of tensors stacked along a
    leading replica dimension. ``groups``: the replicas form that many equal groups (the
    trials of :class:`TrialReplicas`); a call returns ``[groups, n]`` losses whose mean
    over dimension 1 is each group's mean loss. ``fused=False`` never takes the fused path.
    """

    def __init__(self, stacked: StackedModel, loss_fn: LossFn, *, fused: bool = True, groups: int = 1) -> None:
        from torch.func import functional_call, grad_and_value, vmap

        from localsgd.engines.simulated import fused as fusion

        if groups < 1 or stacked.replicas % groups:
            raise ValueError(f"groups must divide the {stacked.replicas} replicas, got {groups}")
        self.stacked = stacked
        self.groups = groups
        module = ModelWithLoss(explicit_batchnorm(stacked.module), loss_fn)
        self._reference_module = module
        names = [f"model.{n}" for n in stacked.param_names]
        buffer_names = [f"model.{n}" for n in stacked.buffer_names]

        def loss(
            params: tuple[torch.Tensor, ...], buffers: tuple[torch.Tensor, ...], batch: Any
        ) -> torch.Tensor:
            state = {**dict(zip(names, params)), **dict(zip(buffer_names, buffers))}
            return functional_call(module, state, (batch,))

        self._one = grad_and_value(loss)
        self._all = vmap(self._one, in_dims=(0, 0, 0), randomness="different")
        self.vectorized = True
        self._proven = False
        self.fallback_reason: str | None = None
        self._fused: fusion.FusedGradients | None = None
        self._fused_checked = False
        self.fused_reason: str | None = "fused=False" if not fused else fusion.unsupported(stacked.module)
        if self.fused_reason is None:
            self._fused = fusion.FusedGradients(
                stacked.module,
                stacked.replicas,
                stacked.param_names,
                list(stacked.stacked),
                stacked.buffer_names,
                stacked.stacked_buffers(),
                loss_fn,
                groups,
            )

    @property
    def path(self) -> str:
        """``fused``, ``vmap`` or ``loop``: how gradients are computed now."""
        if self._fused is not None:
            return "fused"
        return "vmap" if self.vectorized else "loop"

    def __call__(self, batch: Any, *, replica_losses: bool = False) -> torch.Tensor:
        """Set every stacked parameter's ``.grad``; return the ``[groups, n]`` losses
        (``replica_losses``: one per replica, also on the fused path, which otherwise may
        return fewer with the same mean)."""
        if self._fused is not None and not self._fused_checked:
            self._check_fused(batch)
        if self._fused is not None:
            return self._fused(batch, replica_losses=replica_losses).view(self.groups, -1)
        grads, losses = self._functional(batch)
        for p, g in zip(self.stacked.stacked, grads):
            p.grad = g
        return losses.detach().view(self.groups, -1)

    def _check_fused(self, batch: Any) -> None:
        """Compare the fused path with the reference on ``batch`` (dropout off, running
        statistics restored after), and keep it only when they agree."""
        assert self._fused is not None
        self._fused_checked = True
        buffers = self.stacked.stacked_buffers()
        saved = [b.clone() for b in buffers]
        dropouts = [
            m
            for root in (self._fused.model, self._reference_module)
            for m in root.modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training
        ]
        problem: str | None = None
        try:
            for m in dropouts:
                m.eval()
            grads, losses = self._functional(batch)
            _restore(buffers, saved)
            fused_losses = self._fused(batch, replica_losses=True).flatten()
            problem = _mismatch("loss", fused_losses, losses.detach())
            for name, p, g in zip(self.stacked.param_names, self.stacked.stacked, grads):
                problem = problem or _mismatch(f"gradient of {name}", p.grad, g)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            for m in dropouts:
                m.train()
            _restore(buffers, saved)
        if problem is not None:
            self._fused = None
            self.fused_reason = f"fused path disagrees with {self.path}: {problem}"
            log.warning("simulated engine: %s; using %s", self.fused_reason, self.path)

    def _functional(self, batch: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Gradients and ``[K]`` losses through ``vmap``, or the loop when ``vmap`` fails."""
        params = tuple(p.detach() for p in self.stacked.stacked)
        buffers = tuple(self.stacked.stacked_buffers())
        vmap_error: Exception | None = None
        if self.vectorized:
            # The first call may fail half-way, after BatchNorm updated its statistics.
            saved = None if self._proven else [b.clone() for b in buffers]
            try:
                grads, losses = self._all(params, buffers, batch)
                self._proven = True
                return grads, losses
            except Exception as exc:
                if saved is None:
                    raise  # vmap worked before: this is a real error, not a vmap limitation
                _restore(buffers, saved)
                vmap_error = exc
                self.vectorized = False
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "simulated engine: vmap failed (%s); looping over replicas instead", self.fallback_reason
                )
        try:
            results = [
                self._one(
                    tuple(p[k] for p in params),
                    tuple(b[k] for b in buffers),
                    map_nest(functools.partial(_row, k=k), batch),
                )
                for k in range(self.stacked.replicas)
            ]
        except Exception as exc:
            raise exc from vmap_error  # not a vmap limitation after all: show both
        grads = tuple(torch.stack([g[i] for g, _ in results]) for i in range(len(params)))
        return grads, torch.stack([v for _, v in results])


def _restore(tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, s in zip(tensors, saved):
            t.copy_(s)


def _mismatch(what: str, got: torch.Tensor | None, want: torch.Tensor) -> str | None:
    """None when ``got`` equals ``want`` to float32 rounding, else what differs."""
    if got is None:
        return f"{what}: none"
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    return None if diff <= 1e-4 * scale + 1e-6 else f"{what} differs by {diff:.3g} (scale {scale:.3g})"


def _row(t: torch.Tensor, k: int) -> torch.Tensor:
    return t[k]


def replica_details(gradients: ReplicaGradients, delay: Mapping[str, float]) -> dict[str, Any]:
    """What a run's status says about stacked replicas: how gradients were computed (and
    why not fused, or not vectorized), and any delay that was recorded, not waited."""
    out: dict[str, Any] = {
        "vectorized": gradients.path != "loop",
        "path": gradients.path,
        "fallback_reason": gradients.fallback_reason,
        "fused_reason": gradients.fused_reason,
    }
    if delay:
        out["delay_not_waited"] = dict(delay)  # seconds per collective, by scope
    return out
