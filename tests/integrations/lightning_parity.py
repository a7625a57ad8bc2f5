"""Run under ``torchrun --nproc-per-node 2`` (CPU, gloo): the same tiny MLP and data trained
by Lightning (``DDPStrategy``, ``LocalSGDStrategy``) and by ``localsgd.DataParallel`` in a
bare loop, then ``examples/lightning.py``; each rank saves what the test compares
(``OUT/rank<r>.pt``); the example prints its results."""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from localsgd import DataParallel
from localsgd.integrations.lightning import LocalSGDStrategy
from localsgd.run.worker import exit_process

N, FEATURES, BATCH, LR = 48, 6, 4, 0.1  # 24 samples a rank: 6 updates an epoch
LOCAL = {"name": "local_sgd", "period": 4}
# fp16: rank 1's loss overflows at the 4th update (0-based 3), where H = 4 makes a sync due.
OVERFLOW_AT = 3
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning.py"


def data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N + 8, FEATURES, generator=g)
    y = torch.randn(N + 8, 1, generator=g)
    return TensorDataset(x[:N], y[:N]), TensorDataset(x[N:], y[N:])


def shard(dataset: TensorDataset) -> DistributedSampler:
    """This rank's share, in order (torchrun's variables: Lightning starts the process group
    only inside fit)."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def optimizer(model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    # Momentum: a per-rank optimizer state that an exact resume must restore. Fused: the
    # optimizer unscales inside its step (Lightning then never calls the scaler's unscale_).
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, fused=fused or None)


def grad_scaler() -> torch.amp.GradScaler:
    # No growth within a run: the scale halves only at a skipped step.
    return torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000)


def overflow(loss: torch.Tensor, step: int) -> torch.Tensor:
    """The loss, made infinite on rank 1 at update ``OVERFLOW_AT`` (its gradients overflow)."""
    if step == OVERFLOW_AT and int(os.environ["RANK"]) == 1:
        return loss * float("inf")
    return loss


def net_class(base: type) -> type:
    """The LightningModule, over ``lightning.LightningModule`` or ``pytorch_lightning``'s."""

    class Net(base):  # type: ignore[misc, valid-type]
        def __init__(self, manual: bool, fused: bool) -> None:
            super().__init__()
            self.automatic_optimization = not manual
            self.fused = fused
            self.net = mlp()
            self.trace: list[torch.Tensor] = []
            self.validated: list[torch.Tensor] = []
            self.grad_sync: list[bool] = []
            self.scales: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
                loss = overflow(loss, self.trainer.global_step)
            if self.automatic_optimization:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return None

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.trace.append(flat(self.net))
            ddp = self.trainer.strategy.model
            self.grad_sync.append(bool(getattr(ddp, "require_backward_grad_sync", True)))
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                self.scales.append(scaler.get_scale())

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                self.validated.append(flat(self.net))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer(self.net, self.fused)

    return Net


def fit(
    strategy: Any,
    out: Path,
    *,
    epochs: int = 2,
    batch: int = BATCH,
    validate: bool = False,
    checkpoints: Path | None = None,
    ckpt_path: str | None = None,
    trainer_module: Any = L,
    manual: bool = False,
    fused: bool = False,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    train, val = data()
    model = net_class(trainer_module.LightningModule)(manual, fused)
    callbacks = []
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1))
    trainer = trainer_module.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoints is not None,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        default_root_dir=out,
        use_distributed_sampler=False,
        **trainer_kwargs,
    )
    trainer.fit(
        model,
        # Lightning's own sampler would shuffle the training set: this rank's shard, in order,
        # is what the bare loop reads too.
        DataLoader(train, batch_size=batch, sampler=shard(train)),
        DataLoader(val, batch_size=4, sampler=shard(val)) if validate else None,
        ckpt_path=ckpt_path,
    )
    dp = getattr(strategy, "data_parallel", None)
    return {
        "trace": model.trace,
        "final": flat(model.net),
        "validated": model.validated,
        "grad_sync": model.grad_sync,
        "scales": model.scales,
        "global_step": trainer.global_step,
        "stats": dp.stats if dp is not None else None,
    }


def bare(
    algorithm: Any, *, epochs: int = 2, micro: int = 1, fp16: str | None = None, fused: bool = False
) -> dict[str, Any]:
    """The reference: DataParallel around a plain loop over this rank's DistributedSampler
    order, ``micro`` micro-batches of BATCH // micro per update (loss scaled by 1/micro).

    ``fp16``: forward under fp16 autocast, the loss scaled by a GradScaler and overflowing
    as in the Lightning module; ``"stepped"`` steps with ``dp.step(scaler)``, ``"handed"``
    hands the scaler to DataParallel and calls ``unscale_``, ``step``, ``update`` as
    Lightning's MixedPrecision plugin does."""
    train, _ = data()
    sampler = shard(train)
    loader = DataLoader(train, batch_size=BATCH // micro, sampler=sampler)
    model = mlp()
    opt = optimizer(model, fused)
    scaler = grad_scaler() if fp16 else None
    trace, consensus, scales = [], [], []
    with DataParallel(model, opt, algorithm, scaler=scaler if fp16 == "handed" else None) as dp:
        for _ in range(epochs):
            for i, (x, y) in enumerate(loader):
                with torch.autocast("cpu", dtype=torch.half, cache_enabled=False, enabled=fp16 is not None):
                    loss = nn.functional.mse_loss(model(x), y) / micro
                    loss = overflow(loss, len(trace)) if scaler is not None else loss
                (scaler.scale(loss) if scaler is not None else loss).backward()
                if scaler is not None:
                    if fp16 == "handed":
                        scaler.unscale_(opt)
                        scaler.step(opt)
                    else:
                        dp.step(scaler)
                    scaler.update()
                    scales.append(scaler.get_scale())
                    opt.zero_grad()
                elif (i + 1) % micro == 0:
                    opt.step()
                    opt.zero_grad()
                trace.append(flat(model))
            with dp.consensus():
                consensus.append(flat(model))
    return {"trace": trace, "final": flat(model), "consensus": consensus, "stats": dp.stats, "scales": scales}


def refusals() -> list[str]:
    """What the strategy says to arguments it cannot honour."""
    said = []
    for algorithm, kwargs in [
        (LOCAL, {"model_averaging_period": 4}),
        ({"name": "local_sgd", "period": 0}, {}),
    ]:
        try:
            LocalSGDStrategy(algorithm, **kwargs)
        except ValueError as e:
            said.append(str(e))
    return said


def main(out: Path, example_args: list[str]) -> None:
    warnings.filterwarnings("ignore")  # Lightning's advice on num_workers and the like
    results: dict[str, Any] = {
        "ddp": fit(DDPStrategy(), out),
        "minibatch": fit(LocalSGDStrategy({"name": "minibatch_sgd"}), out),
        "local": fit(LocalSGDStrategy(LOCAL), out, validate=True, checkpoints=out / "ckpt"),
        "local_bare": bare(LOCAL),
        "accumulate": fit(
            LocalSGDStrategy(LOCAL), out, epochs=1, batch=BATCH // 2, accumulate_grad_batches=2
        ),
        "accumulate_bare": bare(LOCAL, epochs=1, micro=2),
    }
    # Mid-period (6 updates, H = 4): the replicas differ; the per-rank files carry them.
    results["resumed"] = fit(
        LocalSGDStrategy(LOCAL), out, validate=True, ckpt_path=str(out / "ckpt" / "epoch=0.ckpt")
    )
    # The same checkpoint without the per-rank files: a warned resume from the consensus.
    alone = out / "alone" / f"rank{os.environ['RANK']}"
    alone.mkdir(parents=True)
    shutil.copy(out / "ckpt" / "epoch=0.ckpt", alone / "epoch=0.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results["resumed_without_state"] = fit(
            LocalSGDStrategy(LOCAL), out, validate=True, ckpt_path=str(alone / "epoch=0.ckpt")
        )
    results["resumed_without_state"]["warnings"] = [
        str(w.message) for w in caught if "localsgd-rank" in str(w.message)
    ]
    # An algorithm with state of its own (outer momentum, the anchor model) resumes exactly.
    diloco = {"name": "diloco", "period": 4}
    results["diloco"] = fit(LocalSGDStrategy(diloco), out, checkpoints=out / "diloco")
    results["diloco_resumed"] = fit(
        LocalSGDStrategy(diloco), out, ckpt_path=str(out / "diloco" / "epoch=0.ckpt")
    )
    results["manual"] = fit(LocalSGDStrategy(LOCAL), out, manual=True)
    # fp16 with a GradScaler; Lightning maps precision="16-mixed" on CPU to bf16, so the
    # plugin is built by hand.
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=grad_scaler())
    results["fp16"] = fit(LocalSGDStrategy(LOCAL), out, plugins=[fp16])
    results["fp16_stepped"] = bare(LOCAL, fp16="stepped")
    results["fp16_handed"] = bare(LOCAL, fp16="handed")
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=grad_scaler())
    results["fp16_fused"] = fit(LocalSGDStrategy(LOCAL), out, plugins=[fp16], fused=True)
    results["fp16_fused_bare"] = bare(LOCAL, fp16="stepped", fused=True)
    results["async"] = fit(LocalSGDStrategy({"name": "async_local_sgd", "period": 4}), out, validate=True)
    accumulation = {"name": "gradient_accumulation", "steps": 2}
    results["grad_accumulation_algorithm"] = fit(LocalSGDStrategy(accumulation), out, epochs=1)
    results["grad_accumulation_algorithm_bare"] = bare(accumulation, epochs=1)

    import pytorch_lightning as PL

    from localsgd.integrations.lightning import PLLocalSGDStrategy

    results["pytorch_lightning"] = fit(PLLocalSGDStrategy(LOCAL), out, epochs=1, trainer_module=PL)
    results["refusals"] = refusals()
    results["world_size"] = dist.get_world_size()
    rank = dist.get_rank()
    # The example as a user runs it under torchrun (in this launch, as starting Lightning
    # takes far longer than these runs); last, because it ends the process group.
    sys.argv = [str(EXAMPLE), *example_args, "--checkpoint-dir", str(out / "example")]
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    torch.save(results, out / f"rank{rank}.pt.tmp")
    (out / f"rank{rank}.pt.tmp").rename(out / f"rank{rank}.pt")
    # Done: skip the interpreter's teardown, which can abort a finished gloo process.
    exit_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
