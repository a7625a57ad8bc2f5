"""Flat buffers: one contiguous tensor per dtype, so a sync is one collective per dtype.

Two paths. If the tensors are already consecutive views of one storage (what
:func:`flatten_into_views` makes of a model's parameters), the collective runs on that
storage in place: no copy at all. Otherwise they are packed into a new buffer and the
result is copied back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def group_by_dtype(
    tensors: Iterable[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """Tensors grouped by (device, dtype), first-seen order kept within and across groups."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def contiguous_span(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view covering ``tensors`` if they lie back to back in one storage, else None.

    Writing into the returned view writes into every tensor. All tensors must share one
    dtype and device (callers group first).
    """
    first = tensors[0]
    storage = first.untyped_storage()
    ptr = storage.data_ptr()
    start = first.storage_offset()
    expected = start
    for t in tensors:
        if not t.is_contiguous() or t.storage_offset() != expected or t.untyped_storage().data_ptr() != ptr:
            return None
        expected += t.numel()
    flat = first.new_empty(0)
    flat.set_(storage, start, (expected - start,), (1,))
    return flat


def copies(tensors: Sequence[torch.Tensor], flat: bool) -> list[torch.Tensor]:
    """Copies of ``tensors``, to average (or compute on) while the originals change: back
    to back in one buffer per device and dtype where the model is laid out flat (so a
    collective works on the buffer in place, with no packing), each its own tensor else."""
    if not flat:
        return [t.detach().clone() for t in tensors]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for idx in groups.values():
        buffer = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        for i, view in zip(idx, buffer.split([tensors[i].numel() for i in idx])):
            out[i] = view.view_as(tensors[i])
    return [t for t in out if t is not None]


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A new 1-D buffer holding ``tensors`` back to back."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy ``flat`` back into ``tensors`` (the inverse of :func:`pack`)."""
    views = [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    with torch.no_grad():
        torch._foreach_copy_(list(tensors), views)


def flatten_into_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Re-home ``tensors`` (parameters or buffers) into one contiguous storage per dtype.

    Each tensor's ``.data`` becomes a view of the shared buffer, values unchanged; the
    tensor objects stay the same, so optimizers and modules keep working. Returns the flat
    buffers. Tensors already laid out back to back are left alone.
    """
    flats = []
    for group in group_by_dtype(tensors).values():
        span = contiguous_span(group)
        if span is not None:
            flats.append(span)
            continue
        flat = pack(group)
        offset = 0
        for t in group:
            n = t.numel()
            t.data = flat[offset : offset + n].view_as(t)
            offset += n
        flats.append(flat)
    return flats


REDUCED_IN_FP32 = (torch.bfloat16, torch.float16)
"""Dtypes whose averages are taken in fp32: summed in bf16, K values are rounded after every
addition (8 bits of mantissa) and fp16 sums overflow past 65504; upcast, reduced and
rounded back once, the average is the fp32 mean rounded to the dtype. The collective then
carries fp32, twice the tensors' own bytes, and is counted as such."""


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an average of ``dtype`` tensors is reduced (and sent) in."""
    return torch.float32 if dtype in REDUCED_IN_FP32 else dtype


_DATA_PTR = torch.Tensor.data_ptr


class Spans:
    """The flat spans covering a fixed list of tensors, re-derived only when one moved.

    Finding the spans walks every tensor's storage in Python; a sync of a model with many
    small tensors would pay that every time. Checking that no tensor moved (its data
    pointer is unchanged: one C call per tensor, no Python frame) is a fraction of that
    and keeps a re-homed tensor safe: the spans are found again, or, when the tensors no
    longer lie back to back, the tensors themselves are handed over (packed per call).
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        self._ptrs: list[int] | None = None
        self._spans: list[torch.Tensor] = []

    def get(self) -> list[torch.Tensor]:
        ptrs = list(map(_DATA_PTR, self.tensors))
        if ptrs != self._ptrs:
            spans = (
                [contiguous_span(g) for g in group_by_dtype(self.tensors).values()] if self.tensors else []
            )
            self._spans = (
                [s for s in spans if s is not None] if all(s is not None for s in spans) else self.tensors
            )
            self._ptrs = ptrs
        return self._spans
