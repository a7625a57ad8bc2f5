"""Train a LightningModule with any localsgd algorithm: ``Trainer(strategy=LocalSGDStrategy(...))``.

    torchrun --nproc-per-node 2 examples/lightning.py --algorithm local_sgd --period 8
    python examples/lightning.py --devices 2        # Lightning starts the processes itself
    python examples/lightning.py --algorithm diloco --period 16 --option outer_lr=0.7

The task is a synthetic one made on the spot (a random "teacher" network labels Gaussian
inputs into 4 classes), so nothing is downloaded. Everything but the strategy is plain
Lightning: the module, the loaders, ``Trainer.fit``. Validation during ``fit`` sees the
consensus model; every rank holds it after ``fit``; checkpoints (``--checkpoint-dir``)
hold its weights, and ``--resume CKPT`` continues a run exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# Run as a script, this file would shadow the `lightning` package it imports; a copy under
# another name does not need this line.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from localsgd import algorithms  # noqa: E402
from localsgd.integrations.lightning import LocalSGDStrategy  # noqa: E402

FEATURES, CLASSES = 16, 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="localsgd under PyTorch Lightning")
    p.add_argument("--algorithm", default="local_sgd", choices=algorithms.names())
    p.add_argument("--period", type=int, help="H: local steps between model averagings")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="another field of the algorithm's config (value read as JSON)")  # fmt: skip
    p.add_argument("--devices", type=int, default=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--checkpoint-dir", help="save a checkpoint after every epoch here")
    p.add_argument("--resume", help="a checkpoint to continue from")
    return p.parse_args()


def algorithm_spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": args.algorithm}
    if args.period is not None:
        spec["period"] = args.period
    for option in args.option:
        key, _, value = option.partition("=")
        spec[key] = json.loads(value)
    return spec  # the registry checks the keys and names a wrong one


def synthetic_data(samples: int) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)  # the same data on every process
    teacher = nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, CLASSES))
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g)
    x = torch.randn(samples, FEATURES, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    split = samples * 4 // 5
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


class Classifier(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        accuracy = (self.net(x).argmax(dim=1) == y).float().mean()
        self.log("val_accuracy", accuracy, sync_dist=True)  # averaged over processes

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    args = parse_args()
    L.seed_everything(0, verbose=False)  # the same initial model everywhere
    train, val = synthetic_data(args.samples)
    strategy = LocalSGDStrategy(algorithm_spec(args))
    callbacks = []
    if args.checkpoint_dir:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(args.checkpoint_dir, save_top_k=-1))
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        callbacks=callbacks,
        enable_checkpointing=bool(args.checkpoint_dir),
        logger=False,
        enable_progress_bar=False,
    )
    model = Classifier(args.lr)
    trainer.fit(
        model,
        DataLoader(train, batch_size=args.batch_size, shuffle=True),
        DataLoader(val, batch_size=256),
        ckpt_path=args.resume,
    )
    metrics = trainer.validate(model, DataLoader(val, batch_size=256), verbose=False)[0]
    if trainer.is_global_zero:
        print(f"val_accuracy={metrics['val_accuracy']:.4f}")
        stats = strategy.data_parallel.stats if strategy.data_parallel is not None else {}
        print(f"stats={json.dumps(stats)}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
