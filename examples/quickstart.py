"""Quickstart: train a small 1-D CNN on MNIST-1D with any localsgd algorithm.

    torchrun --nproc-per-node 2 examples/quickstart.py --algorithm local_sgd --period 8
    python examples/quickstart.py                    # a world of one works too

Read it top to bottom. The training loop is an ordinary PyTorch loop,
``zero_grad(); loss.backward(); opt.step()``; wrapping it in ``localsgd.DataParallel``
is the only change data parallelism needs. The algorithm decides what is communicated
and when (gradients every step, models every H steps, ...).

MNIST-1D (Greydanus 2020) is generated locally (a few seconds) and cached as .npz under
``$XDG_CACHE_HOME/localsgd`` (default ``~/.cache/localsgd``), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import localsgd
from localsgd import algorithms

# Command-line flag (argparse dest) -> algorithm config field. A flag is passed to the
# chosen algorithm only if its dataclass has that field; the registry does the rest.
HYPERPARAMETER_FLAGS = {
    "period": "period",  # H: local steps between averagings
    "switch_step": "switch_step",  # t': post_local_sgd's first local step
    "block_period": "block_period",  # H_b: hierarchical block syncs per global sync
    "block_size": "block_size",  # G: ranks per block
    "steps": "steps",  # k: gradient_accumulation's micro-batches per update
    "outer_lr": "outer_lr",  # diloco's outer learning rate
    "outer_momentum": "outer_momentum",  # diloco's outer momentum
    "slow_momentum": "momentum",  # β of slowmo, μ of sma's central model
    "slow_lr": "lr",  # α of slowmo
    "alpha": "alpha",  # sma's pull toward the central model
}


def parse_args() -> tuple[argparse.Namespace, algorithms.AlgorithmConfig]:
    """The command line, and the algorithm config built from it."""
    p = argparse.ArgumentParser(description="Train a 1-D CNN on MNIST-1D with localsgd.")
    p.add_argument("--algorithm", default="local_sgd", choices=algorithms.names())
    p.add_argument("--period", type=int, help="H: local steps between model averagings")
    p.add_argument("--switch-step", type=int, help="t': post_local_sgd's first local step")
    p.add_argument("--block-period", type=int, help="H_b: block syncs per global sync")
    p.add_argument("--block-size", type=int, help="G: consecutive ranks per block")
    p.add_argument("--steps", type=int, help="k: gradient_accumulation micro-batches/update")
    p.add_argument("--outer-lr", type=float, help="diloco: outer learning rate")
    p.add_argument("--outer-momentum", type=float, help="diloco: outer Nesterov momentum")
    p.add_argument("--slow-momentum", type=float, help="slowmo: slow momentum β; sma: μ")
    p.add_argument("--slow-lr", type=float, help="slowmo: slow learning rate α")
    p.add_argument("--alpha", type=float, help="sma: correction toward the central model")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--lr", type=float, default=0.05, help="inner SGD learning rate")
    p.add_argument("--seed", type=int, default=0, help="model init and data order")
    p.add_argument("--num-samples", type=int, default=10000, help="MNIST-1D train+test size")
    p.add_argument("--data-seed", type=int, default=42, help="MNIST-1D generation seed")
    args = p.parse_args()

    # Pass only what the user set, and fail loudly on a flag the algorithm does not have.
    fields = {f.name for f in dataclasses.fields(algorithms.get(args.algorithm))}
    spec: dict[str, Any] = {"name": args.algorithm}
    for dest, field in HYPERPARAMETER_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if field not in fields:
            takes = [f"--{d.replace('_', '-')}" for d, f in HYPERPARAMETER_FLAGS.items() if f in fields]
            p.error(
                f"--{dest.replace('_', '-')} does not apply to {args.algorithm}, "
                f"which takes {takes or 'none of the hyperparameter flags'}"
            )
        spec[field] = value
    try:
        return args, algorithms.build(spec)  # validates every value
    except ValueError as e:
        p.error(str(e))


# -- data --------------------------------------------------------------------------------


def load_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """MNIST-1D arrays x, y, x_test, y_test: generated once, then read from the cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localsgd"
    path = cache / f"mnist1d_n{num_samples}_seed{seed}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    import mnist1d.data  # only needed to generate; never get_dataset(), which downloads

    mnist_args = mnist1d.data.get_dataset_args()
    mnist_args.num_samples = num_samples
    mnist_args.seed = seed
    data = mnist1d.data.make_dataset(mnist_args)
    # Every rank may generate at once: each writes a private temp file, then renames it
    # atomically, so a reader never sees a half-written cache.
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"])
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return {k: data[k] for k in ("x", "y", "x_test", "y_test")}


def epoch_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int, world_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches for one epoch.

    Every rank draws the same permutation (same ``seed``) and takes a disjoint shard of it;
    a new seed each epoch gives new shards. Every rank gets the same number of full
    batches, so the collectives of all ranks line up.
    """
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    per_rank = len(x) // world_size
    shard = perm[rank::world_size][:per_rank]
    n_batches = per_rank // batch_size
    return [(x[idx], y[idx]) for idx in shard[: n_batches * batch_size].split(batch_size)]


# -- model -------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """Three strided 1-D convolutions and a linear head: ~5k parameters, ~90%+ on MNIST-1D
    (the CNN baseline of the MNIST-1D paper)."""

    def __init__(self, channels: int = 25, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)  # length 40 -> 19
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)  # 19 -> 10
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)  # 10 -> 5
        self.head = nn.Linear(channels * 5, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)  # (batch, 1, length)
        h = F.relu(self.conv1(h))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.head(h.flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(y)


# -- training ----------------------------------------------------------------------------


def main() -> None:
    args, algorithm = parse_args()
    info = localsgd.init_distributed()
    try:
        train(args, algorithm, info)
    finally:
        localsgd.destroy_distributed()


def train(args: argparse.Namespace, algorithm: algorithms.AlgorithmConfig, info: localsgd.DistInfo) -> None:
    master = info.rank == 0  # only rank 0 prints
    start = time.perf_counter()

    data = load_mnist1d(args.num_samples, args.data_seed)
    device = info.device  # cuda:LOCAL_RANK under NCCL, else the CPU
    x_train = torch.tensor(data["x"], dtype=torch.float32, device=device)
    y_train = torch.tensor(data["y"], dtype=torch.long, device=device)
    x_test = torch.tensor(data["x_test"], dtype=torch.float32, device=device)
    y_test = torch.tensor(data["y_test"], dtype=torch.long, device=device)

    torch.manual_seed(args.seed)  # same init everywhere (DataParallel broadcasts rank 0's)
    model = ConvNet().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if master:
        run = {k: v for k, v in vars(args).items() if k not in HYPERPARAMETER_FLAGS}
        config = {**run, "algorithm": algorithm.to_dict(), "world_size": info.world_size}
        print(f"config={json.dumps(config)}", flush=True)
        print(
            f"{len(x_train)} train / {len(x_test)} test samples, "
            f"{sum(p.numel() for p in model.parameters())} parameters, "
            f"{info.world_size} worker(s) x batch {args.batch_size}",
            flush=True,
        )

    with localsgd.DataParallel(model, opt, algorithm) as dp:
        for epoch in range(args.epochs):
            batches = epoch_batches(
                x_train, y_train, args.batch_size, info.rank, info.world_size, seed=10_000 * args.seed + epoch
            )
            loss_sum = torch.zeros((), device=device)
            for x, y in batches:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()  # the algorithm runs here, in optimizer step hooks
                loss_sum += loss.detach()

            # Bookkeeping over every worker; record=False keeps it out of dp.stats.
            train_loss = loss_sum / max(len(batches), 1)
            dp.comm.average([train_loss], record=False)
            with dp.consensus() as consensus_model:  # collective: every rank enters
                test_acc = accuracy(consensus_model, x_test, y_test)
            if master:
                print(
                    f"epoch {epoch + 1:3d} | step {dp.stats['steps']:5d} | "
                    f"train_loss {train_loss.item():.4f} | test_acc {test_acc:.4f} | "
                    f"syncs {dp.stats['syncs']} | {time.perf_counter() - start:.1f}s",
                    flush=True,
                )

    # On exit every rank holds the consensus model.
    test_acc = accuracy(model, x_test, y_test)
    if master:
        print(f"test_accuracy={test_acc:.4f}")
        print(f"stats={json.dumps(dp.stats)}")
        print(f"wall_seconds={time.perf_counter() - start:.1f}", flush=True)


if __name__ == "__main__":
    main()
    # Done: everything printed, the process group destroyed. Leave without the interpreter's
    # teardown, which can abort a finished gloo worker (SIGABRT) and make torchrun report
    # the run failed.
    localsgd.exit_process(0)
