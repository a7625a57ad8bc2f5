"""A PyTorch Lightning strategy that runs any localsgd algorithm under ``Trainer.fit``.

::

    import lightning as L
    from localsgd.integrations.lightning import LocalSGDStrategy

    trainer = L.Trainer(strategy=LocalSGDStrategy({"name": "local_sgd", "period": 8}), devices=2)
    trainer.fit(model, loader)          # every rank ends with the consensus model

:class:`LocalSGDStrategy` is Lightning's ``DDPStrategy`` (same launchers, devices, process
group, keyword arguments for ``DistributedDataParallel``) with the algorithm of
:class:`localsgd.DataParallel` around the optimizer: mini-batch SGD lets DDP's all-reduce
average the gradients; every other algorithm runs the backward passes as under
``no_sync()`` and communicates itself in the optimizer step. H counts optimizer updates, so
with ``accumulate_grad_batches=k`` an update is k micro-batches (Lightning's ``no_sync``
around the accumulating ones restores, never re-enables, DDP's gradient sync).

Validation during ``fit`` sees the consensus model (``DataParallel.consensus()``); training
resumes from this replica's own parameters. A checkpoint holds the consensus weights (what
``load_from_checkpoint`` and inference want); each rank writes its replica, the algorithm's
state and its optimizer state to ``<checkpoint>.localsgd-rank<r>.pt`` beside it, so
``fit(ckpt_path=...)`` continues exactly. A checkpoint without them resumes from the
consensus with the algorithm's counters restarted (a warning says so).

``precision="16-mixed"`` works with every algorithm: the precision plugin's ``GradScaler``
is handed to ``DataParallel``, so an overflow on any rank makes every rank skip that step,
and a skipped step still counts toward H (syncs fall at the same updates as in fp32). A fused
optimizer, which unscales inside its step, is unscaled before it, for the ranks to agree.

For ``pytorch_lightning.Trainer`` use :data:`PLLocalSGDStrategy` (the same class over
``pytorch_lightning``'s ``DDPStrategy``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from localsgd.algorithms.base import AlgorithmConfig, build
from localsgd.data_parallel import DataParallel

if TYPE_CHECKING:
    from lightning.pytorch.strategies import DDPStrategy as _Base
else:
    _Base = object

SIDE_STATE_VERSION = 1


def side_file(checkpoint: str | os.PathLike[str], rank: int) -> str:
    """Where rank ``rank`` keeps its own state for ``checkpoint``: its replica's parameters
    and buffers, the algorithm's state and its optimizer's state."""
    path = os.fspath(checkpoint)
    if os.path.islink(path):
        path = os.path.realpath(path)  # ModelCheckpoint(save_last="link") links last.ckpt
    return f"{path}.localsgd-rank{rank}.pt"


class _RunFirst:
    """The training closure, evaluated before ``optimizer.step`` is called.

    Lightning passes forward and backward to ``optimizer.step(closure)``, so torch's step
    pre-hooks would fire before the gradients exist; an algorithm that reads or averages
    gradients in its pre-hook needs them computed. The first call returns the result of
    that run; an optimizer that re-evaluates the closure (L-BFGS) gets fresh ones."""

    def __init__(self, closure: Callable[[], Any]) -> None:
        self._closure = closure
        self._result = closure()
        self._fresh = True

    def ran_backward(self, module: Any) -> bool:
        """Whether the backward pass ran (in automatic optimization, a ``training_step``
        that returns ``None`` skips it, and Lightning then skips the step)."""
        return self._result is not None or not module.automatic_optimization

    def __call__(self) -> Any:
        if self._fresh:
            self._fresh = False
            return self._result
        return self._closure()


class _LocalSGDMixin(_Base):
    """The algorithm's lifetime inside a Lightning DDP strategy (combined with either
    namespace's ``DDPStrategy``)."""

    def __init__(
        self,
        algorithm: AlgorithmConfig | Mapping[str, Any],
        *,
        validate_on_consensus: bool = True,
        flat: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("model_averaging_period") is not None:
            raise ValueError(
                "LocalSGDStrategy averages models itself: pass algorithm={'name': 'local_sgd', "
                "'period': H} instead of model_averaging_period"
            )
        super().__init__(**kwargs)
        self.algorithm = build(algorithm)
        self.validate_on_consensus = validate_on_consensus
        self._flat = flat
        self.data_parallel: DataParallel | None = None
        self._active = False
        self._consensus: contextlib.ExitStack | None = None
        self._side_out: dict[str, Any] | None = None
        self._side_in: dict[str, Any] | None = None
        self._side_missing: str | None = None

    # -- fit: enter, run, leave -------------------------------------------------------------

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if trainer.state.fn != "fit":
            return
        if len(self.optimizers) != 1:
            raise ValueError(
                f"LocalSGDStrategy runs the algorithm around one optimizer; configure_optimizers "
                f"returned {len(self.optimizers)}"
            )
        assert self.model is not None
        # '16-mixed': the precision plugin's unscale_, step and update drive this scaler;
        # handed over, its unscale_ makes the ranks skip an overflowing step together and
        # its update counts a skipped step toward the algorithm's schedule.
        scaler = getattr(self.precision_plugin, "scaler", None)
        self.data_parallel = DataParallel(
            self.model, self.optimizers[0], self.algorithm, flat=self._flat, scaler=scaler
        )
        self.data_parallel.__enter__()
        self._active = True
        if isinstance(self.model, DistributedDataParallel) and not self.algorithm.USES_DDP_GRADIENTS:
            # DDP broadcasts rank 0's buffers before a forward that follows a synced backward;
            # none follows now, and a resumed replica's buffers must stay its own.
            self.model.require_forward_param_sync = False

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().training_step(*args, **kwargs)
        if self._blocks_ddp_sync():
            # Under manual optimization Lightning turns DDP's gradient sync back on after the
            # forward pass, for manual_backward; the algorithm communicates itself.
            assert isinstance(self.model, DistributedDataParallel)
            self.model.require_backward_grad_sync = False
        return out

    def optimizer_step(
        self,
        optimizer: Any,
        closure: Callable[[], Any],
        model: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not self._active:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        first = _RunFirst(closure)
        scaler = getattr(self.precision_plugin, "scaler", None)
        if (
            scaler is not None
            and scaler.is_enabled()
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and first.ran_backward(model or self.lightning_module)
        ):
            # A fused optimizer unscales inside its step, from this rank's gradients alone, and
            # Lightning leaves it to; unscaled here (the ranks agree on an overflow), its step
            # applies the agreed flag.
            scaler.unscale_(optimizer)
        return super().optimizer_step(optimizer, first, model, **kwargs)

    def on_train_end(self) -> None:
        self._leave_consensus()
        if self._active:
            assert self.data_parallel is not None
            self._active = False
            self.data_parallel.__exit__(None, None, None)  # every rank: the consensus model
        super().on_train_end()

    def on_exception(self, exception: BaseException) -> None:
        self._leave_consensus()
        if self._active:
            assert self.data_parallel is not None
            self._active = False
            # No collective: peers may be gone.
            self.data_parallel.__exit__(type(exception), exception, exception.__traceback__)
        super().on_exception(exception)

    def _blocks_ddp_sync(self) -> bool:
        return (
            self._active
            and isinstance(self.model, DistributedDataParallel)
            and not self.algorithm.USES_DDP_GRADIENTS
        )

    # -- validation on the consensus model ---------------------------------------------------

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._active and self.validate_on_consensus:
            self._enter_consensus()

    def on_validation_end(self) -> None:
        self._leave_consensus()
        super().on_validation_end()

    def _enter_consensus(self) -> None:
        assert self.data_parallel is not None and self._consensus is None
        stack = contextlib.ExitStack()
        stack.enter_context(self.data_parallel.consensus())
        self._consensus = stack

    def _leave_consensus(self) -> bool:
        if self._consensus is None:
            return False
        stack, self._consensus = self._consensus, None
        stack.close()  # this replica's parameters back, bit for bit
        return True

    # -- checkpoints --------------------------------------------------------------------------

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model's state dict (collective while fitting: every rank saves), and
        this rank's own state kept for :meth:`save_checkpoint`."""
        if self.data_parallel is None:
            return super().lightning_module_state_dict()
        dp = self.data_parallel
        # ModelCheckpoint may save in on_validation_end, with the consensus in place.
        validating = self._leave_consensus()
        try:
            if self._active:
                with dp.consensus():
                    state = {k: v.detach().clone() for k, v in super().lightning_module_state_dict().items()}
            else:
                state = super().lightning_module_state_dict()
            self._side_out = {
                "version": SIDE_STATE_VERSION,
                "rank": self.global_rank,
                "world_size": self.world_size,
                "data_parallel": dp.state_dict(),
                "optimizer": self.optimizers[0].state_dict(),
            }
        finally:
            if validating:
                self._enter_consensus()
        return state

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        side, self._side_out = self._side_out, None
        if side is not None and "optimizer_states" in checkpoint:  # not a weights-only save
            self.checkpoint_io.save_checkpoint(side, side_file(filepath, self.global_rank))

    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        self.checkpoint_io.remove_checkpoint(side_file(filepath, self.global_rank))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        path = side_file(checkpoint_path, self.global_rank)
        self._side_in, self._side_missing = None, None
        try:
            self._side_in = self.checkpoint_io.load_checkpoint(path, weights_only=True)
        except FileNotFoundError:
            self._side_missing = path
        return checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)  # rank 0's; replaced below by this rank's
        side, self._side_in = self._side_in, None
        if not self._active:
            return
        assert self.data_parallel is not None
        if side is None:
            if self._side_missing is not None and self.global_rank == 0:
                warnings.warn(
                    f"{self._side_missing} is missing: the replicas resume from the checkpoint's "
                    "consensus model and the algorithm's state restarts",
                    stacklevel=2,
                )
            return
        if side.get("version") != SIDE_STATE_VERSION:
            raise ValueError(
                f"per-rank checkpoint state version {side.get('version')!r} is not supported; "
                f"expected {SIDE_STATE_VERSION}"
            )
        if side["world_size"] != self.world_size or side["rank"] != self.global_rank:
            raise ValueError(
                f"per-rank checkpoint state was saved by rank {side['rank']} of {side['world_size']}; "
                f"this is rank {self.global_rank} of {self.world_size}: resume on the same world size"
            )
        self.optimizers[0].load_state_dict(side["optimizer"])
        self.data_parallel.load_state_dict(side["data_parallel"])


def _strategy_class(namespace: str, name: str) -> type:
    # Each Lightning package's Trainer accepts only its own Strategy subclasses.
    ddp = importlib.import_module(f"{namespace}.strategies").DDPStrategy
    return type(name, (_LocalSGDMixin, ddp), {"__module__": __name__, "__doc__": LocalSGDStrategy.__doc__})


class LocalSGDStrategy(_LocalSGDMixin, DDPStrategy):
    """Lightning's DDP strategy with a localsgd algorithm around the optimizer step.

    ``LocalSGDStrategy(algorithm, *, validate_on_consensus=True, flat=True, **ddp_kwargs)``:
    ``algorithm`` is any registered algorithm (a config or a dict such as
    ``{"name": "diloco", "period": 16}``); ``ddp_kwargs`` are ``DDPStrategy``'s
    (``find_unused_parameters``, ``timeout``, ``process_group_backend``, ...).

    Consistency: that of the algorithm (local SGD: parameters identical on every rank after
    every H-th optimizer update); every rank holds the consensus model after ``fit``, in
    validation during ``fit`` and in the weights of every checkpoint.
    Under ``precision="16-mixed"`` a step the ``GradScaler`` skips (any rank's gradients
    overflowed) is skipped on every rank and still counts as an update toward H.
    """


def __getattr__(name: str) -> Any:
    if name == "PLLocalSGDStrategy":
        cls = _strategy_class("pytorch_lightning", name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
