"""A drop-in for accelerate's ``LocalSGD`` that runs any localsgd algorithm.

::

    from localsgd.integrations.accelerate import LocalSGD   # was: from accelerate.local_sgd import LocalSGD

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=8) as local_sgd:
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step(); scheduler.step(); optimizer.zero_grad()
                local_sgd.step()

The arguments are accelerate's (``accelerator``, ``model``, ``local_sgd_steps``,
``enabled``), plus ``algorithm=`` (any registered algorithm, a config or a plain dict;
default: local SGD with H = ``local_sgd_steps``). With gradient accumulation steps of 1 the
parameters match accelerate's class exactly (tested under ``accelerate launch``); what
changes is what crosses the wire: one flat all-reduce per dtype instead of one per tensor,
the floating-point buffers averaged too, and counters (:attr:`LocalSGD.stats`).

The algorithm runs in the step hooks of the optimizer ``accelerator.prepare`` wrapped, so
H counts optimizer updates: under ``accelerator.accumulate`` a micro-batch that does not
step does not count (accelerate's class counts calls of ``step()``). Local steps run as
under ``no_sync()``; mini-batch SGD lets DDP's own all-reduce average the gradients.

An FSDP2 model runs when each replica is sharded on its own: ``ParallelismConfig(
dp_replicate_size=R, dp_shard_size=S)`` and ``fully_shard(module,
mesh=accelerator.torch_device_mesh["dp_shard"])`` before ``accelerator.prepare`` (which
leaves a model already sharded alone); the algorithm averages each rank's shards over
``dp_replicate``. A model accelerate shards itself over both dimensions (HSDP) is refused:
FSDP would all-reduce its gradients over the replicas at every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

from localsgd.algorithms import LocalSGD as LocalSGDConfig
from localsgd.algorithms.base import AlgorithmConfig, build
from localsgd.comm.sharding import is_sharded
from localsgd.data_parallel import DataParallel
from localsgd.util.checks import check_int

SUPPORTED = (
    "NO",
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_XPU",
    "MULTI_MLU",
    "MULTI_HPU",
    "MULTI_SDAA",
    "MULTI_MUSA",
    "MULTI_NPU",
    "MULTI_NEURON",
)
"""accelerate's distributed types its own LocalSGD supports (plain data parallelism)."""

REPLICATE_DIM = "dp_replicate"
"""The dimension of accelerate's device mesh (``ParallelismConfig.dp_replicate_size``) a
sharded model's replicas lie along: the algorithm averages over it."""


class LocalSGD:
    """accelerate's ``LocalSGD`` interface over :class:`localsgd.DataParallel`.

    Consistency: that of ``algorithm`` (local SGD: parameters identical on every process
    after every H-th optimizer update, and on leaving the block).
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        local_sgd_steps: int | None = None,
        enabled: bool = True,
        *,
        algorithm: AlgorithmConfig | Mapping[str, Any] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        from accelerate import DistributedType

        supported = {getattr(DistributedType, n) for n in SUPPORTED if hasattr(DistributedType, n)}
        fsdp2 = accelerator.distributed_type == DistributedType.FSDP and bool(
            getattr(accelerator, "is_fsdp2", False)
        )
        if accelerator.distributed_type not in supported and not fsdp2:
            raise NotImplementedError(
                "LocalSGD is supported for CPUs and GPUs and for FSDP2 (fsdp_version=2) models "
                "sharded within replicas; not for DeepSpeed, MegatronLM or FSDP1"
            )
        if algorithm is None:
            if local_sgd_steps is None:
                raise ValueError("LocalSGD needs local_sgd_steps (H) or an algorithm")
            check_int("local_sgd_steps", local_sgd_steps, 1)
            algorithm = LocalSGDConfig(period=local_sgd_steps)
        self.algorithm = build(algorithm)
        self.accelerator = accelerator
        self.model = model
        self.local_sgd_steps = local_sgd_steps
        self.enabled = enabled and accelerator.distributed_type != DistributedType.NO
        self.num_steps = 0
        self._optimizer = optimizer
        self.dp: DataParallel | None = None

    def __enter__(self) -> LocalSGD:
        if self.enabled:
            self.dp = DataParallel(
                self.model, self._find_optimizer(), self.algorithm, mesh=self._replicate_mesh()
            )
            self.dp.__enter__()
        return self

    def _replicate_mesh(self) -> Any:
        """For a sharded (FSDP2) model, the 1-D mesh of its replicas; else None (the world)."""
        if not is_sharded(list(self.model.parameters())):
            return None
        mesh: Any = getattr(self.accelerator, "torch_device_mesh", None)
        names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if REPLICATE_DIM not in names:
            raise ValueError(
                "a sharded (FSDP2) model needs replicas to average: build the Accelerator with "
                "parallelism_config=ParallelismConfig(dp_replicate_size=R, dp_shard_size=S) and "
                f'shard the model with fully_shard(module, mesh=accelerator.torch_device_mesh["dp_shard"]) '
                f"before accelerator.prepare (the mesh has dimensions {names})"
            )
        return mesh[REPLICATE_DIM]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.dp is not None:
            self.dp.__exit__(exc_type, exc, tb)  # leaves the consensus model everywhere

    def step(self) -> None:
        """Count a step, as accelerate's class does; the algorithm itself already ran in
        the optimizer's step hooks."""
        self.num_steps += 1

    @property
    def stats(self) -> dict[str, Any]:
        """``DataParallel.stats``: steps, syncs, collectives, bytes, seconds (empty when
        disabled)."""
        return self.dp.stats if self.dp is not None else {}

    def _find_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is not None:
            return self._optimizer
        mine = {id(p) for p in self.model.parameters()}
        found = [
            opt
            for opt in getattr(self.accelerator, "_optimizers", [])
            if (ids := {id(p) for g in opt.param_groups for p in g["params"]}) and ids <= mine
        ]
        if len(found) != 1:
            why = "none" if not found else f"{len(found)}"
            raise ValueError(
                f"LocalSGD runs in the step hooks of the model's optimizer, but {why} of the "
                "optimizers accelerator.prepare() returned hold this model's parameters; "
                "prepare the optimizer with the model, or pass optimizer="
            )
        return found[0]
