"""K replicas of a model held as one tensor per parameter with a leading replica dimension
(views of one ``[K, P]`` storage per dtype), with BatchNorm's running statistics kept
explicitly per replica."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

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


class ModelWithLoss(nn.Module):
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


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""Allocations below this come from the heap (glibc's largest threshold on 64-bit)."""
TRIM_THRESHOLD = 256 << 20
"""Freed memory at the top of the heap is given back to the system beyond this."""
_retained: list[bool] = []


def retain_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep the memory a training step frees for the next step;
    True when it does (now or from an earlier call).

    The stacked replicas' tensors are K times a model's: a step allocates and frees
    weight gradients and activations of megabytes, and glibc by default serves such sizes
    by ``mmap`` or gives them back by trimming the heap, so every step faults their pages
    in again (on the MNIST-1D MLP at K = 64, about a quarter of the step). With allocations
    below :data:`MMAP_THRESHOLD` from the heap and trimming only beyond
    :data:`TRIM_THRESHOLD`, the pages stay mapped. A process-wide setting: left alone where
    the process chose its own (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    another allocator in ``LD_PRELOAD``) and off glibc.
    """
    if _retained:
        return _retained[0]
    _retained.append(False)
    if not sys.platform.startswith("linux") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # jemalloc, tcmalloc, ...: they keep their own caches
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl's mallopt does nothing)
    done = (
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    _retained[0] = done
    log.debug("simulated engine: glibc keeps freed memory: %s", done)
    return done
