"""Mini-batch SGD: gradients averaged over all workers before every step (the DDP baseline)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from localsgd.algorithms._common import ParametersAlwaysInSync, average_gradients
from localsgd.algorithms.base import AlgorithmConfig, SyncContext, register, require_keys
from localsgd.algorithms.compressed import compressed_wire
from localsgd.comm.codecs import NO_COMPRESSION, Compression, resolve


@register("minibatch_sgd")
@dataclass(frozen=True)
class MiniBatchSGD(AlgorithmConfig):
    """Synchronous data parallelism: every step uses the gradient averaged over K workers.

    Consistency: parameters are identical on every replica after every step. Buffers
    (BatchNorm statistics) stay local and are averaged into the consensus model. On a model
    wrapped in ``DistributedDataParallel``, DDP's bucketed all-reduce (overlapped with the
    backward pass) does the averaging and nothing is averaged a second time.
    """

    USES_DDP_GRADIENTS: ClassVar[bool] = True
    SYNCHRONOUS_BASELINE: ClassVar[bool] = True

    compression: Compression | Mapping[str, Any] = NO_COMPRESSION
    """What crosses the wire every step (the gradients): ``{codec = "int8", block = 256, ratio
    = 0.01, error_feedback = true}`` (see :mod:`localsgd.comm.codecs`); ``none`` sends it
    exactly."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "compression", resolve("minibatch_sgd", self.compression))

    @property
    def sync_period(self) -> int:
        return 1

    def bind(self, ctx: SyncContext) -> MiniBatchSync:
        return MiniBatchSync(ctx, resolve(self.name, self.compression))


class MiniBatchSync(ParametersAlwaysInSync):
    def __init__(self, ctx: SyncContext, compression: Compression = NO_COMPRESSION) -> None:
        self.ctx = ctx
        self.syncs = 0
        self.wire = compressed_wire(compression)
        if self.wire is not None and ctx.gradients_averaged is not None:
            raise ValueError(
                "compression of gradients needs them averaged by the algorithm; on a "
                "DistributedDataParallel model DDP averages them uncompressed: use compression.codec = 'none'"
            )

    def before_step(self) -> None:
        if self.ctx.gradients_averaged is not None:
            self.ctx.gradients_averaged()  # DDP averaged them during the backward pass
        else:
            average_gradients(self.ctx, self.wire)
        self.syncs += 1

    def skipped_step(self) -> None:
        """Every replica skipped the update: nothing to average. Under DDP the backward
        pass's all-reduce ran all the same, and is counted."""
        if self.ctx.gradients_averaged is not None:
            self.ctx.gradients_averaged()
            self.syncs += 1

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"syncs": self.syncs}
        if self.wire is not None:
            state["compression"] = self.wire.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        require_keys(state, ["syncs"], "minibatch_sgd")
        self.syncs = int(state["syncs"])
        if self.wire is not None:
            require_keys(state, ["compression"], "minibatch_sgd with compression")
            self.wire.load_state_dict(state["compression"])
