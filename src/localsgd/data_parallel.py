"""``DataParallel``: the context manager that runs an algorithm around the user's loop."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from localsgd.algorithms.base import AlgorithmConfig, SyncContext, Synchronizer, build
from localsgd.comm import sharding
from localsgd.comm.base import CommStats, Communicator
from localsgd.comm.flat import flatten_into_views
from localsgd.comm.sharding import local_tensor
from localsgd.comm.solo import SoloCommunicator

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

STATE_VERSION = 1


def default_communicator() -> Communicator:
    """The world's process group if one is up with more than one rank, else a world of one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from localsgd.comm.process_group import ProcessGroupCommunicator

        return ProcessGroupCommunicator()
    return SoloCommunicator()


class DataParallel:
    """Run ``algorithm`` around ``optimizer.step()`` for the duration of a ``with`` block.

    ::

        with localsgd.DataParallel(model, opt, algorithms.LocalSGD(period=8)) as dp:
            for x, y in loader:
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        print(dp.stats)

    On enter, every replica is made identical to rank 0's (parameters and buffers) and
    optimizer step hooks are registered; on a clean exit the hooks are removed and every
    rank holds the consensus model. An exception inside the block propagates; hooks are
    removed and no collective is attempted (peers may be gone).

    ``flat=True`` re-homes parameters and floating-point buffers into one contiguous
    storage per dtype (values, tensor objects and optimizer references unchanged), so a
    sync is a single in-place collective with no packing copies.

    A model wrapped in ``DistributedDataParallel`` (what ``accelerator.prepare`` returns
    with several processes) is accepted: mini-batch SGD lets DDP's bucketed all-reduce,
    overlapped with the backward pass, average the gradients (and counts its buckets);
    every other algorithm runs the backward passes as under ``no_sync()`` and communicates
    itself. An optimizer wrapper that steps an inner ``optimizer`` (accelerate's
    ``AcceleratedOptimizer``) is unwrapped: the hooks go where the update happens.

    fp16 with a ``torch.amp.GradScaler``: a step the scaler skips (gradients overflowed)
    never calls ``optimizer.step()``, so the hooks cannot see it. It still counts: the
    algorithm's schedule advances as if the step had been taken with no update, and an
    averaging due at that step happens at it (not deferred), so syncs fall at the same step
    counts as in an fp32 run. Either step through :meth:`step` (``dp.step(scaler)`` in place
    of ``scaler.step(optimizer)``), or hand the scaler over (``scaler=``; taken from an
    ``AcceleratedOptimizer``'s ``scaler`` by itself) when other code calls ``scaler.step``
    and ``scaler.update`` (accelerate, a trainer): for the ``with`` block the scaler's
    ``unscale_`` then makes every rank agree on the overflow (as :meth:`unscale_` does) and
    its ``update`` reports a skipped step.

    A model sharded with FSDP2's ``fully_shard`` over ``mesh["shard"]`` of a 2-D mesh
    (``mesh_dim_names=("replicate", "shard")``) runs with ``mesh=mesh``: the algorithm
    averages each rank's local shards with the same shards of the other replicas over the
    ``replicate`` dimension, and its state dict holds this rank's shards (see
    :mod:`localsgd.comm.sharding`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        algorithm: AlgorithmConfig | Mapping[str, Any],
        *,
        comm: Communicator | None = None,
        flat: bool = True,
        scaler: Any = None,
        mesh: DeviceMesh | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            driven = getattr(optimizer, "scaler", None)  # accelerate's wrapper drives one
            if scaler is None and isinstance(driven, torch.amp.GradScaler):
                scaler = driven
            optimizer = inner  # a wrapper calls inner.step() only when it really steps
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        from torch.nn.parallel import DistributedDataParallel

        self.model = model
        self._ddp = model if isinstance(model, DistributedDataParallel) else None
        self._ddp_sync: bool | None = None
        self._ddp_buckets: list[int] | None = None
        self.optimizer = optimizer
        self.algorithm = build(algorithm)
        if mesh is not None and comm is not None:
            raise ValueError("give mesh= or comm=, not both: mesh= averages over its 'replicate' dimension")
        self._comm = comm
        self._mesh = mesh
        self._flat = flat
        self._sync: Synchronizer | None = None
        self._ctx: SyncContext | None = None
        self._hooks: list[Any] = []
        self._steps = 0
        self._pending: Mapping[str, Any] | None = None
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self._scaler: torch.amp.GradScaler | None = scaler
        self._unwatch: dict[str, Any] = {}
        self._stepped = False
        """Whether the step hooks ran since the watched scaler's last ``update``."""

    # -- the with block ---------------------------------------------------------------------

    def __enter__(self) -> DataParallel:
        if self._hooks:
            raise RuntimeError("this DataParallel is already entered; it is not reentrant")
        if self._comm is None:
            self._comm = (
                default_communicator() if self._mesh is None else sharding.replicate_communicator(self._mesh)
            )
        comm = self._comm
        params: list[torch.Tensor] = [p for p in self.model.parameters() if p.requires_grad]
        self._check_optimizer()
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        owners = None
        if sharding.is_sharded(params):
            params, owners = self._local_shards(params)
        elif self._flat:
            flatten_into_views(params + buffers)
        everything = [local_tensor(p) for p in self.model.parameters()] + list(self.model.buffers())
        comm.broadcast(everything, src=0, record=False)
        self._ctx = SyncContext(
            comm, params, buffers, self.optimizer, flat=self._flat and owners is None, owners=owners
        )
        if self._ddp is not None:
            self._ddp_sync = self._ddp.require_backward_grad_sync
            if self.algorithm.USES_DDP_GRADIENTS:
                self._ctx.gradients_averaged = self._count_ddp_buckets
            else:
                self._ddp.require_backward_grad_sync = False  # what no_sync() sets
        self._sync = self.algorithm.bind(self._ctx)
        self._hooks = [
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
        ]
        if self._scaler is not None and self._scaler.is_enabled():
            self._watch(self._scaler)
        log.debug("rank %d: entered %s over %d ranks", comm.rank, self.algorithm, comm.world_size)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._scaler is not None and self._unwatch:
            for name, previous in self._unwatch.items():
                if previous is None:
                    del self._scaler.__dict__[name]
                else:
                    self._scaler.__dict__[name] = previous
            self._unwatch = {}
        if self._ddp is not None and self._ddp_sync is not None:
            self._ddp.require_backward_grad_sync = self._ddp_sync
        if exc_type is None and self._sync is not None:
            self._sync.finalize()

    def _count_ddp_buckets(self) -> None:
        """Record the all-reduces DDP ran in this backward pass: one per gradient bucket, of
        the bucket's bytes. Their time overlaps the backward pass and is not measured."""
        assert self._ddp is not None
        if self._ddp_buckets is None or not self._ddp._has_rebuilt_buckets:
            # DDP rebuilds its buckets once, after the first backward pass, in use order.
            sizes = str(self._ddp._get_ddp_logging_data().get("bucket_sizes", ""))
            self._ddp_buckets = [int(b) for b in sizes.split(",") if b.strip()]
        for nbytes in self._ddp_buckets:
            self.comm.stats.record("world", nbytes, 0.0)

    def _local_shards(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The local shards of a sharded model's parameters, and the parameters (see
        :mod:`localsgd.comm.sharding`)."""
        if not self.algorithm.capabilities.sharded_parameters:
            raise ValueError(f"algorithm {self.algorithm.name!r} does not run on a sharded (FSDP2) model")
        sharding.check_shard_mesh(params, self._comm)
        sharding.settle(self.model)
        owners: list[torch.Tensor] = [p for p in self.model.parameters() if p.requires_grad]
        return [local_tensor(p) for p in owners], owners

    def _check_optimizer(self) -> None:
        known = {id(p) for p in self.model.parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in known:
                    raise ValueError(
                        f"optimizer holds a parameter of shape {tuple(p.shape)} that is not "
                        "in the model; build the optimizer from model.parameters()"
                    )

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        assert self._sync is not None
        self._sync.before_step()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        assert self._sync is not None
        self._steps += 1
        self._stepped = True
        self._sync.after_step()

    def _skipped_step(self) -> None:
        """A step the scaler skipped: counted, and the algorithm's schedule advances with no
        update (its ``skipped_step``, or ``after_step``: a sync due now happens now)."""
        assert self._sync is not None
        self._steps += 1
        getattr(self._sync, "skipped_step", self._sync.after_step)()

    def _watch(self, scaler: torch.amp.GradScaler) -> None:
        """Make ``scaler``'s own ``unscale_`` agree across ranks and its ``update`` report a
        skipped step of this optimizer, for the ``with`` block (instance attributes, removed
        on exit)."""
        from torch.amp.grad_scaler import OptState

        unscale, update = scaler.unscale_, scaler.update

        def unscale_(optimizer: torch.optim.Optimizer) -> None:
            unscale(optimizer)
            if optimizer is self.optimizer:
                self._agree_on_overflow(scaler)

        def update_(new_scale: Any = None) -> None:
            state = scaler._per_optimizer_states.get(id(self.optimizer))
            if state is not None and state["stage"] is OptState.STEPPED and not self._stepped:
                self._skipped_step()  # scaler.step ran for this optimizer, the hooks did not
            self._stepped = False
            update(new_scale)

        self._unwatch = {name: scaler.__dict__.get(name) for name in ("unscale_", "update")}
        scaler.unscale_ = unscale_  # type: ignore[method-assign]
        scaler.update = update_  # type: ignore[method-assign]
        self._stepped = False

    # -- what users read --------------------------------------------------------------------

    @property
    def comm(self) -> Communicator:
        if self._comm is None:
            raise RuntimeError("the communicator exists once DataParallel has been entered")
        return self._comm

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def stats(self) -> dict[str, Any]:
        """Steps, syncs and the communicator's counters: collectives, bytes, seconds."""
        comm_stats = self._comm.stats if self._comm is not None else CommStats()
        return {
            "steps": self._steps,
            "syncs": self._sync.syncs if self._sync is not None else 0,
            **comm_stats.as_dict(),
        }

    @property
    def updates(self) -> int:
        """Updates of the consensus model so far: the steps, or, for an algorithm that keeps
        the consensus on a server, the server's updates (on the rank that hosts it)."""
        counted = getattr(self._sync, "updates", None)
        return int(counted) if counted is not None else self._steps

    @property
    def details(self) -> dict[str, Any]:
        """What the algorithm has to say for the run's record (a parameter server's staleness
        distribution and lost workers, say); ``{}`` for most."""
        report = getattr(self._sync, "details", None)
        return dict(report()) if report is not None else {}

    @contextlib.contextmanager
    def consensus(self) -> Iterator[nn.Module]:
        """Temporarily put the consensus model in place (for evaluation), then restore
        this replica exactly. Collective: every rank must enter it at the same step. Its
        traffic is not counted in :attr:`stats`."""
        if self._sync is None or self._ctx is None:
            raise RuntimeError("consensus() needs an entered DataParallel")
        saved = [t.detach().clone() for t in self._ctx.params + self._ctx.buffers]
        self._sync.write_consensus(record=False)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._ctx.params + self._ctx.buffers, saved)

    def unscale_(self, scaler: Any) -> None:
        """``scaler.unscale_(optimizer)``, then make every rank agree on whether gradients
        overflowed, so that ``scaler.step(optimizer)`` steps on all ranks or on none.

        A ``torch.amp.GradScaler`` decides to skip a step from *this rank's* gradients; a
        rank that skips alone would leave the others waiting in a collective (mini-batch
        SGD) or out of step (local SGD). Call it between ``scaler.scale(loss).backward()``
        and ``scaler.step(optimizer)``. Collective; not counted in :attr:`stats`."""
        scaler.unscale_(self.optimizer)
        if not self._watching(scaler):
            self._agree_on_overflow(scaler)  # a watched scaler's unscale_ agreed already

    def _agree_on_overflow(self, scaler: Any) -> None:
        state = getattr(scaler, "_per_optimizer_states", {}).get(id(self.optimizer))
        if not state or "found_inf_per_device" not in state:
            raise RuntimeError(
                "this GradScaler keeps no per-device overflow flags after unscale_ (is it enabled?)"
            )
        found = state["found_inf_per_device"]
        local = torch.tensor([float(sum(float(v.item()) for v in found.values()) > 0)], dtype=torch.float64)
        self.comm.average([local], record=False)  # > 0 when any rank overflowed
        for flag in found.values():
            flag.fill_(1.0 if local.item() > 0 else 0.0)

    def step(self, scaler: Any) -> bool:
        """``scaler.step(optimizer)`` that keeps the algorithm's schedule when the scaler
        skips the step (gradients overflowed): the step is counted and a sync due at it
        happens. Unscales first, as :meth:`unscale_` (every rank skips together), unless
        that was done already (to clip gradients, say). Returns whether the update was
        applied. Call ``scaler.update()`` after, as usual."""
        from torch.amp.grad_scaler import OptState

        if not self._hooks:
            raise RuntimeError("step() needs an entered DataParallel (inside the with block)")
        if scaler.is_enabled():
            state = scaler._per_optimizer_states.get(id(self.optimizer))
            if state is None or state["stage"] is OptState.READY:
                self.unscale_(scaler)
        before = self._steps
        scaler.step(self.optimizer)
        applied = self._steps > before
        if not applied and scaler.is_enabled() and not self._watching(scaler):
            self._skipped_step()  # a watched scaler reports it from update()
        return applied

    def _watching(self, scaler: Any) -> bool:
        """Whether ``scaler`` is the one handed over, watched for this ``with`` block."""
        return scaler is self._scaler and bool(self._unwatch)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: the algorithm's (counters, outer momentum, central model),
        this replica's parameters and buffers (they differ between syncs), step and
        communication counters. Save one per rank, with the optimizer's own state dict.
        For a sharded model these are this rank's local shards, with where they sit."""
        if self._sync is None:
            raise RuntimeError("state_dict() needs an entered DataParallel")
        comm_stats = self.comm.stats
        return {
            "version": STATE_VERSION,
            "algorithm_config": self.algorithm.to_dict(),
            "algorithm": self._sync.state_dict(),
            "replica": {k: v.detach().clone() for k, v in self._replica().items()},
            "shards": sharding.layout(self.model),
            "steps": self._steps,
            "comm": {
                "collectives": comm_stats.collectives,
                "bytes": comm_stats.bytes,
                "seconds": comm_stats.seconds,
                "by_scope": {k: dict(v) for k, v in comm_stats.by_scope.items()},
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, inside the ``with`` block (after the
        broadcast on enter), so the run continues exactly."""
        if self._sync is None:
            raise RuntimeError(
                "load_state_dict() must be called inside the with block: entering "
                "broadcasts rank 0's model, which would overwrite a restored replica"
            )
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"state version {state.get('version')!r} is not supported; expected {STATE_VERSION}"
            )
        saved_algo = state.get("algorithm_config", {})
        if saved_algo.get("name") != self.algorithm.name:
            raise ValueError(
                f"state was saved by algorithm {saved_algo.get('name')!r}, "
                f"this DataParallel runs {self.algorithm.name!r}"
            )
        sharding.check_layout(state.get("shards"), sharding.layout(self.model))
        replica = self._replica()
        saved = state["replica"]
        if set(saved) != set(replica):
            raise ValueError(
                f"state replica names differ from the model's: missing "
                f"{sorted(set(replica) - set(saved))}, unexpected {sorted(set(saved) - set(replica))}"
            )
        with torch.no_grad():
            for name, tensor in replica.items():
                if tensor.shape != saved[name].shape:
                    raise ValueError(
                        f"state replica {name!r} has shape {tuple(saved[name].shape)}, "
                        f"the model's has {tuple(tensor.shape)}"
                    )
                tensor.copy_(saved[name])
        self._sync.load_state_dict(state["algorithm"])
        self._steps = int(state["steps"])
        comm_stats = self.comm.stats
        saved_comm = state["comm"]
        comm_stats.collectives = int(saved_comm["collectives"])
        comm_stats.bytes = int(saved_comm["bytes"])
        comm_stats.seconds = float(saved_comm["seconds"])
        comm_stats.by_scope = {k: dict(v) for k, v in saved_comm["by_scope"].items()}

    def _replica(self) -> dict[str, torch.Tensor]:
        return sharding.shard_names(self.model)
