"""The fused stacked path of the simulated engine: K replicas of common layers in one kernel
each, without ``vmap``.

The K replicas' batches are concatenated into one batch of K·B samples, and the model runs
once on it, with each layer that holds parameters replaced by its stacked form:

- ``Linear``: one batched matmul over the replicas (``torch.baddbmm`` of ``[K, B, in]`` by
  ``[K, in, out]``);
- ``Conv1d``/``Conv2d``: one grouped convolution (groups × K) on ``[B, K·C, ...]``;
- ``BatchNorm1d``/``BatchNorm2d``: one batch-norm kernel on ``[B, K·C, ...]``, whose
  channels are the K replicas' channels, so each replica's statistics are its own; the
  running statistics are updated per replica as ``nn.BatchNorm`` does;
- parameter-free per-sample layers (activations, pooling, dropout, flatten) run on the
  concatenated batch unchanged.

The order of samples in the concatenated batch is chosen once per model: replica-major
(``k·B + b``) when it has only linear layers, so that a batched matmul reads and writes
it in place, or sample-major (``b·K + k``) when it has convolutions or batch norm, so that
``[B·K, C, ...]`` *is* ``[B, K·C, ...]`` and those kernels need no copy. When every
channel layer is 1-D, they run *length-first* instead (:class:`Layout`): as 2-D
channels-last kernels on ``[1, K·C, L, B]``, whose memory ``[L, B, K, C]`` is a view of the
``[B·K, C, L]`` the model's own code sees; on a CPU this is about twice as fast.

The loss is the workload's, called once on the concatenated batch. For a loss that is a
mean over samples (cross-entropy, MSE with ``reduction="mean"``) it is the mean of the K
replicas' losses, and K times its gradient is each replica's own gradient (the replicas
share no parameter). :class:`FusedGradients` checks this once, on the first batch, against
the ``vmap`` path (per-replica losses and gradients), and the caller falls back to ``vmap``
when the check fails: a model whose ``forward`` mixes samples, a loss that sums.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from localsgd.util.nest import map_nest

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]

# Layers without parameters or buffers that treat every sample of a batch on its own.
PER_SAMPLE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
# Per-sample only when the dimension they act on is not the batch's.
ALONG_DIM: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.Softmax, nn.LogSoftmax)
STACKED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_CHANNELS = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` has no fused path (a module it cannot stack), or None when it has."""
    for name, module in model.named_modules():
        where = name or type(model).__name__
        if isinstance(module, STACKED):
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
                return f"{where}: padding_mode={module.padding_mode!r}"
            if isinstance(module, nn.SyncBatchNorm):
                return f"{where}: SyncBatchNorm"
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            return f"{where}: {type(module).__name__} holds tensors of its own"
        if next(module.children(), None) is not None:
            continue  # a container: its forward runs as written, on the concatenated batch
        if isinstance(module, PER_SAMPLE):
            continue
        if isinstance(module, ALONG_DIM):
            dim = getattr(module, "start_dim", getattr(module, "dim", None))
            if isinstance(dim, int) and dim >= 1:
                continue
            return f"{where}: {type(module).__name__} over dim {dim}"
        return f"{where}: {type(module).__name__} is not one of the stacked layers"
    return None


class Layout:
    """Where replica k's sample b sits in the concatenated batch of K·B samples, and the
    form in which the channel layers (convolution, batch norm) see it.

    ``replica_major``: sample ``k·B + b`` (models of linear layers only). Otherwise
    ``b·K + k``, and the channel layers see ``[B, K·C, ...]`` (a view of ``[B·K, C, ...]``),
    or, with ``length_first`` (models whose channel layers are all 1-D), the 2-D form
    ``[1, K·C, L, B]`` in channels-last memory ``[L, B, K, C]``: a 1-D convolution is then
    a 2-D one with a ``(kernel, 1)`` kernel over the plane ``(L, B)``, and batch norm
    reduces over that plane; both kernels run on the channels-last path, which on a CPU is
    several times faster at these small lengths than the channels-first one, and
    ``[L, B, K, C]`` memory is still a view of the ``[B·K, C, L]`` the model sees.
    """

    def __init__(self, replicas: int, replica_major: bool, length_first: bool = False) -> None:
        self.k = replicas
        self.replica_major = replica_major
        self.length_first = length_first and not replica_major

    def concat(self, t: torch.Tensor) -> torch.Tensor:
        """``[K, B, ...]`` -> the concatenated ``[K·B, ...]``."""
        return t.flatten(0, 1) if self.replica_major else t.transpose(0, 1).flatten(0, 1)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """The concatenated ``[K·B, ...]`` -> ``[K, B, ...]`` (a view)."""
        if self.replica_major:
            return t.unflatten(0, (self.k, -1))
        return t.unflatten(0, (-1, self.k)).transpose(0, 1)

    def to_channels(self, x: torch.Tensor) -> torch.Tensor:
        """``[K·B, C, ...]`` -> ``[B, K·C, ...]``: replica k's channels at ``k·C ...``
        (``length_first``: ``[B·K, C]`` or ``[B·K, C, L]`` -> ``[1, K·C, L, B]``, channels
        last; a view when ``x`` came from :meth:`from_channels`, else one copy)."""
        if self.length_first:
            x3 = x if x.dim() == 3 else x.unsqueeze(-1)  # [B·K, C, L]
            n, c, length = x3.shape
            memory = x3.permute(2, 0, 1).contiguous()  # [L, B·K, C]
            # Built by view and permute so that the strides are the canonical channels-last
            # ones, N's included: oneDNN's convolution backward miscomputes the input gradient
            # of an input whose (size-1) N dimension has another stride.
            return memory.view(1, length, n // self.k, self.k * c).permute(0, 3, 1, 2)
        if not self.replica_major:
            return x.view(x.shape[0] // self.k, self.k * x.shape[1], *x.shape[2:])
        return self.split(x).transpose(0, 1).flatten(1, 2)

    def from_channels(self, y: torch.Tensor, ndim: int = 3) -> torch.Tensor:
        """``[B, K·C, ...]`` -> ``[K·B, C, ...]`` (``length_first``: ``[1, K·C, L, B]`` ->
        ``[B·K, C, L]``, or ``[B·K, C]`` for ``ndim`` 2; a view of channels-last memory)."""
        if self.length_first:
            _, kc, length, b = y.shape
            planes = y.permute(0, 2, 3, 1).reshape(length, b * self.k, kc // self.k).permute(1, 2, 0)
            return planes.squeeze(-1) if ndim == 2 else planes  # [B·K, C(, L)]
        channels = y.shape[1] // self.k
        if not self.replica_major:
            return y.view(y.shape[0] * self.k, channels, *y.shape[2:])
        return self.concat(y.unflatten(1, (self.k, channels)).transpose(0, 1))


class _StackedLinear(torch.autograd.Function):
    """``y_k = x_k W_kᵀ + b_k`` for every replica k, with the weight gradient computed in
    the weight's own layout ``[K, out, in]`` (autograd's would be the transpose, copied)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        w = weight.transpose(1, 2)
        return torch.bmm(x, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class FusedLinear(nn.Module):
    """K replicas of ``nn.Linear``: one batched matmul over the replica dimension."""

    def __init__(self, layout: Layout, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.layout = layout
        self.tensors = [weight, bias]  # a list: the stacked model owns (and registers) them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.tensors
        xs = self.layout.split(x)  # [K, B, ..., in]
        flat = xs.reshape(self.layout.k, -1, xs.shape[-1])
        out = _StackedLinear.apply(flat, weight, bias)
        return self.layout.concat(out.view(*xs.shape[:-1], out.shape[-1]))


class FusedConv(nn.Module):
    """K replicas of ``nn.Conv1d``/``nn.Conv2d``: one convolution with K times the groups
    (a 1-D one as a 2-D one over ``(L, B)`` when the layout is ``length_first``)."""

    def __init__(self, layout: Layout, conv: nn.Conv1d | nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.layout = layout
        self.tensors: list[torch.Tensor | None] = [weight, bias]
        self.planar = layout.length_first and isinstance(conv, nn.Conv1d)
        self.conv: Any = F.conv2d if self.planar or isinstance(conv, nn.Conv2d) else F.conv1d
        padding: Any = conv.padding
        if self.planar:
            padding = padding if isinstance(padding, str) else (padding[0], 0)
        self.options: dict[str, Any] = {
            "stride": (conv.stride[0], 1) if self.planar else conv.stride,
            "padding": padding,
            "dilation": (conv.dilation[0], 1) if self.planar else conv.dilation,
            "groups": conv.groups * layout.k,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.tensors
        assert weight is not None
        w = weight.reshape(-1, *weight.shape[2:])  # [K·C_out, C_in / groups, ...]
        if self.planar:
            # The kernel (k, 1) over (L, B), converted once to the input's channels-last
            # layout: oneDNN would otherwise convert it in the forward and again in the backward.
            w = w.unsqueeze(-1).contiguous(memory_format=torch.channels_last)
        b = None if bias is None else bias.reshape(-1)
        out = self.conv(self.layout.to_channels(x), w, b, **self.options)
        return self.layout.from_channels(out)


class FusedBatchNorm(nn.Module):
    """K replicas of ``nn.BatchNorm1d``/``2d``: one batch-norm kernel over ``K·C`` channels,
    so each replica normalizes with its own batch statistics; running statistics are
    updated per replica with the momentum rule of ``nn.BatchNorm`` (unbiased variance, or
    the cumulative average when ``momentum`` is None)."""

    def __init__(
        self,
        layout: Layout,
        bn: nn.modules.batchnorm._BatchNorm,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        buffers: dict[str, torch.Tensor],
    ) -> None:
        super().__init__()
        self.layout = layout
        self.tensors = [weight, bias]
        self.buffers_ = buffers  # running_mean, running_var, num_batches_tracked: [K, ...]
        self.eps = bn.eps
        self.momentum = bn.momentum
        self.track = bn.track_running_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.tensors
        w = None if weight is None else weight.reshape(-1)
        b = None if bias is None else bias.reshape(-1)
        xc = self.layout.to_channels(x)
        running = self.buffers_.get("running_mean")
        if self.training or running is None:
            out, mean, invstd = torch.native_batch_norm(xc, w, b, None, None, True, 0.0, self.eps)
            if self.training and self.track and running is not None:
                self._update(xc, mean, invstd)
        else:
            out = F.batch_norm(
                xc,
                running.reshape(-1),
                self.buffers_["running_var"].reshape(-1),
                w,
                b,
                False,
                0.0,
                self.eps,
            )
        return self.layout.from_channels(out, x.dim())

    @torch.no_grad()
    def _update(self, xc: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> None:
        k = self.layout.k
        n = xc.numel() // xc.shape[1]
        var = (invstd.pow(-2) - self.eps) * (n / max(n - 1, 1))  # unbiased, as nn.BatchNorm
        tracked = self.buffers_["num_batches_tracked"]
        tracked.add_(1)
        momentum: float | torch.Tensor
        if self.momentum is None:
            momentum = (1.0 / tracked.double()).to(mean.dtype).unsqueeze(1)
        else:
            momentum = self.momentum
        for name, value in (("running_mean", mean), ("running_var", var)):
            buf = self.buffers_[name]
            buf.mul_(1 - momentum).add_(value.view(k, -1) * momentum)


def fused_model(
    template: nn.Module,
    replicas: int,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
) -> tuple[nn.Module, Layout]:
    """A copy of ``template`` whose stacked layers compute all ``replicas`` at once from the
    stacked ``params`` and ``buffers`` (by the template's names; used, not copied)."""
    channels = [m for m in template.modules() if isinstance(m, _CHANNELS)]
    layout = Layout(
        replicas,
        replica_major=not channels,
        length_first=all(isinstance(m, (nn.Conv1d, nn.BatchNorm1d)) for m in channels),
    )
    model = copy.deepcopy(template)
    for name, module in list(model.named_modules()):
        if not isinstance(module, STACKED):
            continue

        def tensor(
            field: str, source: dict[str, torch.Tensor] = params, prefix: str = name
        ) -> torch.Tensor | None:
            return source.get(f"{prefix}.{field}" if prefix else field)

        fused: nn.Module
        if isinstance(module, nn.Linear):
            fused = FusedLinear(layout, _required(tensor("weight"), name), tensor("bias"))
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            fused = FusedConv(layout, module, _required(tensor("weight"), name), tensor("bias"))
        else:
            assert isinstance(module, nn.modules.batchnorm._BatchNorm)
            stats = {
                field: t
                for field in ("running_mean", "running_var", "num_batches_tracked")
                if (t := tensor(field, buffers)) is not None
            }
            fused = FusedBatchNorm(layout, module, tensor("weight"), tensor("bias"), stats)
        fused.train(module.training)
        _replace(model, name, fused)
    if layout.length_first:
        for module in model.modules():
            if isinstance(module, PER_SAMPLE):
                module.register_forward_hook(_gradient_in_output_layout)
    return model, layout


def _gradient_in_output_layout(module: nn.Module, args: Any, output: Any) -> None:
    """Have the gradient of a per-sample layer's output arrive in that output's memory
    layout. In the ``length_first`` layout the model's own code may reshape (a flatten
    before the classifier copies ``[L, B, K, C]`` memory into ``[B·K, C·L]``), and the
    gradient comes back in the copy's layout; an elementwise backward (ReLU's) over two
    layouts is several times slower than one copy, and every kernel before it (batch
    norm, convolution) would then leave the channels-last path too."""
    if isinstance(output, torch.Tensor) and output.requires_grad and _dense(output):
        output.register_hook(functools.partial(_as_strided_like, strides=output.stride()))


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory once each (some permutation of contiguous)."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _as_strided_like(grad: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor | None:
    if grad.stride() == strides:
        return None
    out = torch.empty_strided(grad.shape, strides, dtype=grad.dtype, device=grad.device)
    return out.copy_(grad)


def _required(t: torch.Tensor | None, name: str) -> torch.Tensor:
    assert t is not None, f"{name}: a stacked layer without a trainable weight"
    return t


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("the model itself is a single stacked layer; wrap it in nn.Sequential")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _rows(t: torch.Tensor, g: int, per: int) -> torch.Tensor:
    """Replicas ``g·per ... g·per + per - 1`` of a stacked ``[K, B, ...]``, concatenated."""
    return t[g * per : (g + 1) * per].flatten(0, 1)


def _replay(output: torch.Tensor) -> nn.Module:
    return cast(nn.Module, _Replay(output))  # the loss only calls its model


class _Replay:
    """Returns a given output whatever it is called with: replays part of the fused
    model's output to the workload's loss (which only calls its model)."""

    def __init__(self, output: torch.Tensor) -> None:
        self.output = output

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.output


class FusedGradients:
    """Gradients of K stacked replicas through :func:`fused_model` (see the module
    docstring). ``groups`` > 1: the replicas form that many equal groups (trials), and a
    call returns each group's mean loss."""

    def __init__(
        self,
        template: nn.Module,
        replicas: int,
        param_names: Sequence[str],
        params: Sequence[torch.Tensor],
        buffer_names: Sequence[str],
        buffers: Sequence[torch.Tensor],
        loss_fn: LossFn,
        groups: int = 1,
    ) -> None:
        self.k = replicas
        self.groups = groups
        self.params = list(params)
        self.model, self.layout = fused_model(
            template, replicas, dict(zip(param_names, params)), dict(zip(buffer_names, buffers))
        )
        self.loss_fn = loss_fn
        self._vmap_parts = True
        self._vmapped_loss = torch.func.vmap(lambda out, part: loss_fn(_replay(out), part))
        self._outputs: list[Any] = []
        self.model.register_forward_hook(lambda module, args, output: self._outputs.append(output))

    def __call__(self, batch: Any, *, replica_losses: bool = False) -> torch.Tensor:
        """Set every stacked parameter's ``.grad``; return the ``[G, 1]`` group mean losses
        (``[K, 1]`` per-replica losses when ``replica_losses``)."""
        self._outputs.clear()
        concat = map_nest(self.layout.concat, batch)
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.model, concat)
        (loss * self.k).backward()
        if len(self._outputs) != 1 or not isinstance(self._outputs[0], torch.Tensor):
            raise ValueError(
                f"the loss called the model {len(self._outputs)} time(s) or it returned no single "
                "tensor; the fused path needs one call returning a tensor"
            )
        parts = self.k if replica_losses else self.groups
        output = self._outputs.pop().detach()
        if parts == 1:
            return loss.detach().reshape(1, 1)
        with torch.no_grad():
            out = self.layout.split(output)  # [K, B, ...]
            losses = self._part_losses(out, batch, parts)
        return losses.detach().reshape(parts, 1)

    def _part_losses(self, out: torch.Tensor, batch: Any, parts: int) -> torch.Tensor:
        """The loss of each of ``parts`` equal groups of replicas from the model's output
        ``[K, B, ...]`` (the model is not run again): ``vmap`` over the groups, or a loop
        when the loss cannot be vmapped."""
        per = self.k // parts

        def grouped(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(parts, per * t.shape[1], *t.shape[2:])  # replica-major in each group

        if self._vmap_parts:
            try:
                return self._vmapped_loss(out.reshape(parts, -1, *out.shape[2:]), map_nest(grouped, batch))
            except Exception as exc:  # a loss vmap cannot trace: one call per group instead
                log.debug("fused path: group losses by a loop (%s: %s)", type(exc).__name__, exc)
                self._vmap_parts = False
        return torch.stack(
            [
                self.loss_fn(_replay(_rows(out, g, per)), map_nest(functools.partial(_rows, g=g, per=per), batch))
                for g in range(parts)
            ]
        )
