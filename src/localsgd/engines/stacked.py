"""Stacked replicas, the parts of the simulated engine: K replicas of a model held as one
tensor per parameter with a leading replica dimension, their communicator, and their
gradients (fused stacked layers, ``vmap``, or a loop).

Every parameter and buffer is held stacked along a leading replica dimension, as views of
one ``[K, P]`` storage per dtype. Gradients of all replicas come from the fused stacked
layers of :mod:`localsgd.engines.fused` where the model is built of them, else from one
``vmap(grad(...))`` over ``torch.func.functional_call``; the optimizer steps the stacked
tensors (exact for elementwise optimizers); the algorithms run unchanged against
:class:`SimulatedCommunicator`, whose ``average`` is a mean over the replica dimension and
whose counters are those the process engine would have recorded on each rank.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from localsgd.comm.base import WORLD, Block, CommStats, Scope, check_block
from localsgd.comm.flat import group_by_dtype
from localsgd.util.nest import map_nest

log = logging.getLogger(__name__)

# Optimizers whose update of a stacked tensor equals the per-replica updates: each element
# depends only on its own gradient and state (no norms or products across elements).
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


def check_elementwise(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers whose step mixes elements (the stacked step would mix replicas)."""
    if not isinstance(optimizer, ELEMENTWISE_OPTIMIZERS):
        allowed = sorted(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
        raise ValueError(
            f"the simulated engine steps all replicas as one stacked tensor, which is exact only "
            f"for elementwise optimizers; {type(optimizer).__name__} is not one of {allowed}"
        )


def replica_span(tensors: Sequence[torch.Tensor], replicas: int) -> torch.Tensor | None:
    """A ``[K, n]`` view covering ``tensors`` if they are consecutive column blocks of one
    ``[K, P]`` storage (each a ``[K, ...]`` slice whose rows are contiguous), else None."""
    first = tensors[0]
    if first.dim() == 0 or first.shape[0] != replicas:
        return None
    row_stride = first.stride(0)
    ptr = first.untyped_storage().data_ptr()
    start = first.storage_offset()
    expected = start
    for t in tensors:
        if (
            t.dim() == 0
            or t.shape[0] != replicas
            or (replicas > 1 and t.stride(0) != row_stride)
            or t.storage_offset() != expected
            or t.untyped_storage().data_ptr() != ptr
            or not t[0].is_contiguous()
        ):
            return None
        expected += t[0].numel()
    return first.as_strided((replicas, expected - start), (row_stride, 1), start)


class SimulatedCommunicator:
    """The communicator of K stacked replicas: ``average`` is a mean over dimension 0
    (within blocks of G consecutive replicas for a block scope).

    ``groups`` > 1: the stacked replicas are that many independent worlds of K each (the
    trials of :class:`TrialReplicas`), consecutive along dimension 0; every collective
    stays inside its world, and ``world_size`` is K.

    Counters match the process engine's per-rank counters: one collective per dtype per
    call, ``bytes`` = one replica's payload. ``seconds`` is the time the mean took here,
    not a network time (the cost model estimates that).
    """

    def __init__(self, replicas: int, groups: int = 1) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self._k = replicas
        self._worlds = groups
        self._stacked = replicas * groups
        self._stats = CommStats()

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return self._k

    @property
    def stats(self) -> CommStats:
        return self._stats

    def prepare(self, scope: Scope) -> None:
        if isinstance(scope, Block):
            check_block(scope, self._k)

    def _groups(self, tensors: Sequence[torch.Tensor]) -> Iterator[tuple[list[torch.Tensor], int]]:
        for members in group_by_dtype(tensors).values():
            for t in members:
                if t.dim() == 0 or t.shape[0] != self._stacked:
                    raise ValueError(
                        f"simulated engine: expected tensors stacked along a leading replica "
                        f"dimension of {self._stacked}, got shape {tuple(t.shape)}"
                    )
            yield members, sum(t[0].numel() * t.element_size() for t in members)

    @torch.no_grad()
    def average(self, tensors: Sequence[torch.Tensor], scope: Scope = WORLD, *, record: bool = True) -> None:
        size = scope.size if isinstance(scope, Block) else self._k
        if isinstance(scope, Block):
            check_block(scope, self._k)
        if size == 1 or not tensors:
            return  # as the process engine: a group of one exchanges and counts nothing
        for members, nbytes in self._groups(tensors):
            start = time.perf_counter()
            span = replica_span(members, self._stacked)
            for view in [span] if span is not None else members:
                blocks = view.unflatten(0, (self._stacked // size, size))
                blocks.copy_(blocks.mean(1, keepdim=True).expand_as(blocks))
            if record:
                self._stats.record(scope.label(), nbytes, time.perf_counter() - start)

    @torch.no_grad()
    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0, *, record: bool = True) -> None:
        if not tensors or self._k == 1:
            return
        for members, nbytes in self._groups(tensors):
            start = time.perf_counter()
            for t in members:
                worlds = t.unflatten(0, (self._worlds, self._k))
                worlds.copy_(worlds[:, src : src + 1].expand_as(worlds))
            if record:
                self._stats.record("world", nbytes, time.perf_counter() - start)


class StackedModel(nn.Module):
    """K replicas of ``template``: every parameter and buffer stacked along dimension 0.

    Floating-point tensors of one dtype are views of a single ``[K, P]`` storage, so one
    mean over dimension 0 averages the whole model. ``template`` keeps the architecture
    (and serves evaluation); its own tensors are not trained.
    """

    def __init__(self, template: nn.Module, replicas: int) -> None:
        super().__init__()
        self.replicas = replicas
        self.template = [template]  # a list, so its parameters are not registered here
        self.param_names = [n for n, p in template.named_parameters() if p.requires_grad]
        self.buffer_names = [n for n, _ in template.named_buffers()]
        self.replica_ndim: dict[int, int] = {}
        params = dict(template.named_parameters())
        stacked_params = _stack([params[n].detach() for n in self.param_names], replicas)
        self.stacked = nn.ParameterList([nn.Parameter(t) for t in stacked_params])
        for p, n in zip(self.stacked, self.param_names):
            self.replica_ndim[id(p)] = params[n].ndim
        buffers = dict(template.named_buffers())
        for i, t in enumerate(_stack([buffers[n] for n in self.buffer_names], replicas)):
            self.register_buffer(f"buffer_{i}", t)

    @property
    def module(self) -> nn.Module:
        return self.template[0]

    def stacked_buffers(self) -> list[torch.Tensor]:
        return [getattr(self, f"buffer_{i}") for i in range(len(self.buffer_names))]

    def load_replica_into_template(self, k: int) -> nn.Module:
        """Copy replica ``k`` into the template module and return it (for evaluation)."""
        module = self.module
        named = dict(module.named_parameters())
        named_buffers = dict(module.named_buffers())
        with torch.no_grad():
            for name, p in zip(self.param_names, self.stacked):
                named[name].copy_(p[k])
            for name, b in zip(self.buffer_names, self.stacked_buffers()):
                named_buffers[name].copy_(b[k])
        return module


def _stack(tensors: Sequence[torch.Tensor], replicas: int) -> list[torch.Tensor]:
    """Each tensor repeated ``replicas`` times along a new dim 0, floating-point ones as
    column blocks of one ``[K, P]`` storage per dtype."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.is_floating_point():
            by_dtype.setdefault((t.device, t.dtype), []).append(i)
        else:
            out[i] = t.detach().unsqueeze(0).repeat(replicas, *([1] * t.dim())).contiguous()
    for (device, dtype), idx in by_dtype.items():
        total = sum(tensors[i].numel() for i in idx)
        flat = torch.empty(replicas, total, device=device, dtype=dtype)
        offset = 0
        for i in idx:
            t = tensors[i]
            view = flat[:, offset : offset + t.numel()].view(replicas, *t.shape)
            view.copy_(t.detach().unsqueeze(0).expand_as(view))
            out[i] = view
            offset += t.numel()
    assert all(t is not None for t in out)
    return [t for t in out if t is not None]


LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss(model, batch)``: a workload's training loss."""


class _Loss(nn.Module):
    """``loss(model, batch)`` as a module of its own, so ``functional_call`` can swap the
    model's tensors for one replica's (names gain a ``model.`` prefix)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = [loss_fn]  # a list: a bound method of a workload is not a module

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn[0](self.model, batch)


class _ExplicitRunningStats:
    """BatchNorm whose running statistics are updated by explicit in-place ops.

    Under ``vmap`` the fused kernel's own update of batched running statistics is lost;
    this mixin computes the same update (momentum average of the batch mean and unbiased
    variance, or the cumulative average when momentum is None) and normalizes with the
    batch statistics, as ``nn.BatchNorm*`` does in training mode.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: Any = self
        if not (bn.training and bn.track_running_stats):
            return super().forward(x)  # type: ignore[misc]
        bn._check_input_dim(x)
        # One pass: the kernel's batch mean and inverse std give the running update too.
        out, mean, invstd = torch.native_batch_norm(x, bn.weight, bn.bias, None, None, True, 0.0, bn.eps)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            var = (invstd.detach().pow(-2) - bn.eps) * (n / max(n - 1, 1))  # unbiased, as nn.BatchNorm
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked
            bn.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
            bn.running_var.mul_(1 - momentum).add_(var * momentum)
        return out


def explicit_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose BatchNorm layers update their statistics explicitly."""
    import copy

    module = copy.deepcopy(module)
    for sub_module in module.modules():
        if isinstance(sub_module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            sub_module, nn.SyncBatchNorm
        ):
            cls = type(sub_module)
            sub_module.__class__ = type(f"Explicit{cls.__name__}", (_ExplicitRunningStats, cls), {})
    return module


class ReplicaGradients:
    """Per-replica losses and gradients of a :class:`StackedModel`, all replicas at once.

    Three paths, the first that fits: ``fused`` (:mod:`localsgd.engines.fused`: the model
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

        from localsgd.engines import fused as fusion

        if groups < 1 or stacked.replicas % groups:
            raise ValueError(f"groups must divide the {stacked.replicas} replicas, got {groups}")
        self.stacked = stacked
        self.groups = groups
        module = _Loss(explicit_batchnorm(stacked.module), loss_fn)
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

    def __call__(self, batch: Any) -> torch.Tensor:
        """Set every stacked parameter's ``.grad``; return the ``[groups, n]`` losses."""
        if self._fused is not None and not self._fused_checked:
            self._check_fused(batch)
        if self._fused is not None:
            return self._fused(batch)
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
