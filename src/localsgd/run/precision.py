"""Mixed precision for the training loop: ``train.precision = "fp32" | "bf16" | "fp16"``.

The forward pass runs under ``torch.autocast`` in bf16 or fp16 (CUDA, and CPU: bf16
autocast works there too); parameters, gradients, the optimizer and every averaging stay in
fp32. fp16 multiplies the loss by a ``torch.amp.GradScaler``'s scale before the backward
pass; before the step the gradients are unscaled and every worker learns whether any
worker's overflowed (``Replicas.unscale_``), so a skipped step is skipped everywhere. A
skipped step is still a step of the run and of the algorithm's schedule
(``DataParallel.step``): syncs fall at the same steps as in an fp32 run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """``workload`` with its loss computed under autocast (and scaled, for fp16); every
    other attribute is the workload's own."""

    def __init__(self, workload: Any, device: torch.device, precision: str) -> None:
        self._workload = workload
        self.device_type = device.type
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._workload, name)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss = self._workload.loss(model, batch)
        loss = loss.float()
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscaled(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss returned by :meth:`loss` without the scale (exact: scales are powers of 2)."""
        return loss / self.scaler.get_scale() if self.scaler is not None else loss


def with_precision(workload: Any, device: torch.device, precision: str) -> Any:
    """The workload as the training loop should use it under ``precision``."""
    return workload if precision == "fp32" else MixedPrecision(workload, device, precision)
