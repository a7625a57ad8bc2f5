"""Any localsgd algorithm inside transformers' ``Trainer.train()``.

::

    from localsgd import algorithms
    from localsgd.integrations.transformers import LocalSGDTrainer   # was: from transformers import Trainer

    trainer = LocalSGDTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                              algorithm=algorithms.LocalSGD(period=8))
    trainer.train()                 # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model()            # the consensus model

Launch as any Trainer script (``torchrun --nproc-per-node N``, ``accelerate launch``). The
Trainer wraps the model in ``DistributedDataParallel`` as usual; :class:`LocalSGDCallback`
enters :class:`localsgd.DataParallel` over the wrapped model and the prepared optimizer
when training begins, so the algorithm runs in the optimizer's step hooks and H counts
optimizer updates (gradient accumulation composes: the micro-batches of one update are one
step). Mini-batch SGD lets DDP's all-reduce average the gradients; every other algorithm
runs its local steps without it and communicates itself.

What the subclass adds to the callback, because a callback cannot do it:

- ``evaluate()`` and ``save_model()`` during training use the consensus model (every rank
  takes part, as the Trainer already has every rank call them), then put each replica back;
- every checkpoint folder gets one ``localsgd-rank<r>.pt`` per rank (the algorithm's state,
  the replica, and this rank's optimizer and gradient scaler states, which differ between
  replicas and which the Trainer saves from rank 0 only), and ``train(resume_from_checkpoint=...)``
  restores them, so a resumed run continues exactly;
- ``log()`` adds the syncs and bytes so far (``localsgd/syncs``, ``localsgd/bytes``).

``LocalSGDMixin`` gives the same to another Trainer subclass (``class MyTrainer(LocalSGDMixin,
Seq2SeqTrainer)``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from localsgd.algorithms.base import AlgorithmConfig, build
from localsgd.data_parallel import DataParallel

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

STATE_FILE = "localsgd-rank{rank}.pt"
"""A checkpoint folder's per-rank state, beside the Trainer's ``rng_state_<r>.pth``."""


class LocalSGDCallback(TrainerCallback):
    """Runs ``algorithm`` around the optimizer steps of one ``trainer.train()`` call.

    Consistency: that of ``algorithm`` (local SGD: replicas identical after every H-th
    optimizer update), and every rank holds the consensus model when training ends.
    Created by :class:`LocalSGDMixin`, which hands it the trainer (a callback is not given
    the DDP-wrapped model) and the checkpoint to resume from.
    """

    def __init__(
        self, trainer: Trainer, algorithm: AlgorithmConfig | Mapping[str, Any], *, flat: bool = True
    ):
        self.trainer = trainer
        self.algorithm = build(algorithm)
        self.flat = flat
        self.dp: DataParallel | None = None
        self.active = False
        self.resume_from: str | None = None

    # -- the Trainer's events ---------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self.trainer
        # By now the Trainer has wrapped the model (model_wrapped: DDP with several
        # processes), prepared the optimizer, and loaded a resumed checkpoint's model,
        # optimizer and scheduler (rank 0's, which this rank's own state replaces below).
        assert trainer.optimizer is not None, "the Trainer creates its optimizer before on_train_begin"
        # torch.compile (args.torch_compile) wraps the DDP model; DataParallel must see the
        # DDP model itself to turn its gradient sync off for local steps.
        model = getattr(trainer.model_wrapped, "_orig_mod", trainer.model_wrapped)
        self.dp = DataParallel(model, trainer.optimizer, self.algorithm, flat=self.flat)
        self.dp.__enter__()
        self.active = True
        if self.resume_from is not None:
            self._load(self.resume_from)
        log.info(
            "rank %d: step %d: training with %s", self.dp.rank, state.global_step, self.algorithm.label()
        )

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self.active:
            return
        folder = os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._save(folder)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.active:
            self.active = False
            assert self.dp is not None
            self.dp.__exit__(None, None, None)  # every rank now holds the consensus model

    def abort(self, exc: BaseException) -> None:
        """Remove the hooks after a failed ``train()``; no collective (peers may be gone)."""
        if self.active:
            self.active = False
            assert self.dp is not None
            self.dp.__exit__(type(exc), exc, exc.__traceback__)

    # -- what users read --------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """``DataParallel.stats`` of the latest ``train()``: steps, syncs, collectives, bytes,
        seconds (``{}`` before training)."""
        return self.dp.stats if self.dp is not None else {}

    # -- checkpoints ------------------------------------------------------------------------

    def _save(self, folder: str) -> None:
        assert self.dp is not None
        os.makedirs(folder, exist_ok=True)
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        state = {
            "world_size": self.dp.world_size,
            "data_parallel": self.dp.state_dict(),
            "optimizer": self.dp.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        path = os.path.join(folder, STATE_FILE.format(rank=self.dp.rank))
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a checkpoint never holds half a state file

    def _load(self, folder: str) -> None:
        assert self.dp is not None
        path = os.path.join(folder, STATE_FILE.format(rank=self.dp.rank))
        if not os.path.isfile(path):
            raise ValueError(
                f"resume_from_checkpoint: {path} is missing; resume from a checkpoint that "
                f"LocalSGDTrainer wrote with the same number of processes ({self.dp.world_size})"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["world_size"] != self.dp.world_size:
            raise ValueError(
                f"resume_from_checkpoint: {folder} was written by {state['world_size']} processes, "
                f"this run has {self.dp.world_size}"
            )
        self.dp.load_state_dict(state["data_parallel"])
        self.dp.optimizer.load_state_dict(state["optimizer"])
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])


class LocalSGDMixin:
    """Adds ``algorithm=`` (any registered algorithm: a config or a plain dict) to a
    ``transformers.Trainer`` subclass; see the module docstring.

    Not supported (refused on construction): DeepSpeed and FSDP (the Trainer's own sharding;
    they do not run the optimizer step that the hooks need), and ``load_best_model_at_end``
    (the best checkpoint would be loaded before the algorithm's last averaging).
    """

    localsgd: LocalSGDCallback

    def __init__(
        self, *args: Any, algorithm: AlgorithmConfig | Mapping[str, Any], flat: bool = True, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        trainer: Trainer = self  # type: ignore[assignment]
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(
                "args: LocalSGDTrainer runs on DDP (torchrun, accelerate launch), not under "
                "DeepSpeed or FSDP; drop args.deepspeed / args.fsdp"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and trainer.args.world_size == 1:
            # Without CUDA and without args.use_cpu, the Trainer sets up no process group and
            # every launched process would train its own model.
            raise ValueError(
                f"args: {launched} processes were launched (WORLD_SIZE) but the Trainer runs "
                "without a process group; on a machine without CUDA set args.use_cpu = True"
            )
        if trainer.args.load_best_model_at_end:
            raise ValueError(
                "args.load_best_model_at_end is not supported by LocalSGDTrainer: the best "
                "checkpoint would be loaded before the algorithm's final averaging"
            )
        self.localsgd = LocalSGDCallback(trainer, algorithm, flat=flat)
        trainer.add_callback(self.localsgd)
        if not self.localsgd.algorithm.USES_DDP_GRADIENTS and trainer.args.average_tokens_across_devices:
            # The Trainer would all-gather every update's label count to normalise the loss
            # over the world: a collective per local step, which local steps exist to avoid.
            log.warning(
                "%s: setting args.average_tokens_across_devices = False (local steps normalise "
                "the loss over this process's batch and do not communicate)",
                self.localsgd.algorithm.label(),
            )
            trainer.args.average_tokens_across_devices = False

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        trainer: Trainer = self  # type: ignore[assignment]
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(str(trainer.args.output_dir))
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint: no checkpoint in args.output_dir ({trainer.args.output_dir})"
                )
        self.localsgd.resume_from = (
            resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            self.localsgd.abort(exc)
            raise

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's ``save_model`` of the consensus model. During training (checkpoints)
        it is collective, as the Trainer calls it on every rank; after training every rank
        holds the consensus already."""
        dp = self.localsgd.dp
        if self.localsgd.active and dp is not None:
            with dp.consensus():
                super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        else:
            super().save_model(output_dir, _internal_call)  # type: ignore[misc]

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's ``evaluate`` of the consensus model (collective during training, as
        the Trainer's evaluation already is)."""
        dp = self.localsgd.dp
        if self.localsgd.active and dp is not None:
            with dp.consensus():
                return super().evaluate(*args, **kwargs)  # type: ignore[misc]
        return super().evaluate(*args, **kwargs)  # type: ignore[misc]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.localsgd.dp is not None:
            stats = self.localsgd.dp.stats
            logs = {**logs, "localsgd/syncs": stats["syncs"], "localsgd/bytes": stats["bytes"]}
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class LocalSGDTrainer(LocalSGDMixin, Trainer):
    """``transformers.Trainer`` with ``algorithm=``: any localsgd algorithm runs around its
    optimizer steps; checkpoints resume exactly; ``save_model`` writes the consensus."""
