"""Compressed averaging for the algorithms (``compression = {codec = ...}``).

What is compressed is what the papers compress: a change, not a model.

- Model averaging (local SGD, post-local SGD after its switch, hierarchical local SGD,
  SlowMo, DiLoCo) sends each replica's change since the last sync of the whole world,
  Δ_k = x_a − x_k, with x_a the model right after it (identical everywhere; a
  hierarchical block average leaves x_a alone and its blocks' Δ cumulative). After the exchange every replica holds x_a − mean_k decode(encode(Δ_k)). For
  SlowMo and DiLoCo x_a is the outer anchor x_0, so Δ_k is the pseudo-gradient and the
  outer step sees its compressed mean. A change is small and centred near zero, where a
  min-max or top-k code spends its levels well; the parameters themselves are not.
- Mini-batch SGD (and SwitchedSync's steps before t') sends gradients.

Only parameters are compressed; buffers (BatchNorm statistics) and an averaged optimizer
state travel exactly, in a second collective. Evaluation's consensus (``record=False``) is
an exact average. Every replica ends a compressed sync with the same bits (see
:mod:`localsgd.comm.codecs` for the collective).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from localsgd.algorithms.base import SyncContext, load_tensors, require_keys
from localsgd.comm.base import WORLD, Scope, World
from localsgd.comm.codecs import Compression, WireState
from localsgd.comm.flat import copies


class DeltaCompression:
    """The anchor x_a and the residuals of a model averaging's compressed deltas."""

    def __init__(self, ctx: SyncContext, compression: Compression) -> None:
        self.ctx = ctx
        self.wire = WireState(compression)
        self.anchor = [p.detach().clone() for p in ctx.params]
        # Δ's buffers, reused by every sync and laid out as the model (one buffer per dtype
        # when it is flat), so the communicator averages them in place: no model-sized
        # allocation or packing per sync.
        self.delta = copies(ctx.params, ctx.flat)

    @torch.no_grad()
    def __call__(self, scope: Scope = WORLD) -> None:
        params, delta = self.ctx.params, self.delta
        torch._foreach_copy_(delta, self.anchor)
        torch._foreach_sub_(delta, params)
        self.ctx.comm.average(delta, scope, codec=self.wire)
        torch._foreach_copy_(params, self.anchor)
        torch._foreach_sub_(params, delta)
        if isinstance(scope, World):
            # A block's average leaves the anchor where the world last agreed: anchors of
            # different blocks would differ, and so would the next world average.
            torch._foreach_copy_(self.anchor, params)

    @torch.no_grad()
    def restart(self) -> None:
        """x_a ← the current parameters (identical on every replica): post-local SGD's switch."""
        torch._foreach_copy_(self.anchor, self.ctx.params)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.clone() for a in self.anchor], "wire": self.wire.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:

        require_keys(state, ["anchor", "wire"], "compression")
        load_tensors("compression.anchor", self.anchor, state["anchor"])
        self.wire.load_state_dict(state["wire"])


def compressed_wire(compression: Compression) -> WireState | None:
    """The wire state of a call site that compresses, None where ``codec = "none"``."""
    return WireState(compression) if compression.enabled else None


def average_through(ctx: SyncContext, tensors: Sequence[torch.Tensor], wire: WireState | None) -> None:
    """Average ``tensors`` over the world, compressed through ``wire`` when there is one
    (the uncompressed call is left exactly as it was, for communicators that know no codec)."""
    if wire is None:
        ctx.comm.average(tensors, WORLD)
    else:
        ctx.comm.average(tensors, WORLD, codec=wire)
