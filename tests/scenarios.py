"""Per-rank training scenarios run by the distributed tests (importable by spawned ranks)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import localsgd
from localsgd import algorithms as A
from localsgd.workloads import mnist1d
from localsgd.workloads.base import TensorWorkload

IN, OUT = 6, 3


def make_model(seed: int = 0, depth: int = 11, width: int = 8, extra_f64: bool = False) -> nn.Module:
    """An MLP of ``depth`` linear layers (2·depth parameter tensors); optionally a float64
    head so the model has two dtypes."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, OUT))
    model = nn.Sequential(*layers)
    if extra_f64:
        model = MixedPrecisionModel(model)
    return model


class MixedPrecisionModel(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.scale = nn.Linear(OUT, OUT).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.body(x).double()).float()


def batch(rank: int, step: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: fixed by (rank, step) alone."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    return torch.randn(size, IN, generator=g), torch.randint(0, OUT, (size,), generator=g)


def concat_batch(world: int, step: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(batch(r, step, size) for r in range(world)))
    return torch.cat(xs), torch.cat(ys)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def loss_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def train_plain(steps: int, **opt_kwargs: Any) -> nn.Module:
    """One model trained alone, without DataParallel, on rank 0's batches."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), **opt_kwargs)
    for step in range(steps):
        loss_step(model, opt, *batch(0, step))
    return model


def sgd(model: nn.Module, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-4 if momentum else 0.0
    )


def train(
    algo: A.AlgorithmConfig,
    rank: int,
    steps: range,
    *,
    model: nn.Module | None = None,
    opt: torch.optim.Optimizer | None = None,
    momentum: float = 0.0,
    batch_fn: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] = batch,
) -> tuple[nn.Module, dict[str, Any]]:
    model = model if model is not None else make_model()
    opt = opt if opt is not None else sgd(model, momentum)
    with localsgd.DataParallel(model, opt, algo) as dp:
        for step in steps:
            loss_step(model, opt, *batch_fn(rank, step))
        stats = dp.stats
    return model, stats


# -- equivalences -----------------------------------------------------------------------------


def equivalences(rank: int, world: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    steps = range(20)

    # One process on the concatenated batch (no communication at all).
    ref = make_model()
    ref_opt = sgd(ref)
    for step in steps:
        loss_step(ref, ref_opt, *concat_batch(world, step))
    out["reference"] = flat(ref)
    out["minibatch"] = flat(train(A.MiniBatchSGD(), rank, steps)[0])
    out["local_h1"] = flat(train(A.LocalSGD(period=1), rank, steps)[0])

    # Post-local SGD = mini-batch SGD until the switch, then local SGD from that state.
    switch, period = 6, 4
    out["post_local"] = flat(
        train(A.PostLocalSGD(switch_step=switch, period=period), rank, steps, momentum=0.9)[0]
    )
    m = make_model()
    o = sgd(m, 0.9)
    train(A.MiniBatchSGD(), rank, range(switch), model=m, opt=o)
    out["post_local_prefix"] = flat(m)
    train(A.LocalSGD(period=period), rank, range(switch, 20), model=m, opt=o)
    out["minibatch_then_local"] = flat(m)
    out["post_local_at_switch"] = flat(
        train(A.PostLocalSGD(switch_step=switch, period=period), rank, range(switch), momentum=0.9)[0]
    )
    out["minibatch_momentum_at_switch"] = flat(train(A.MiniBatchSGD(), rank, range(switch), momentum=0.9)[0])

    # SlowMo and DiLoCo after a switch: mini-batch SGD until t', then outer steps from the
    # model at t' with zero momentum; the same rounds as post-local SGD.
    out["minibatch_momentum"] = flat(train(A.MiniBatchSGD(), rank, steps, momentum=0.9)[0])
    out["post_local_syncs"] = torch.tensor(
        train(A.PostLocalSGD(switch_step=switch, period=period), rank, steps, momentum=0.9)[1]["syncs"]
    )
    switched: dict[str, A.AlgorithmConfig] = {
        "slowmo": A.SlowMo(period=period, outer_momentum=0.5, switch_step=switch),
        "diloco": A.DiLoCo(period=period, outer_lr=0.7, outer_momentum=0.9, switch_step=switch),
    }
    for name, outer in switched.items():
        model, stats = train(outer, rank, steps, momentum=0.9)
        out[f"{name}_switched"] = flat(model)
        out[f"{name}_switched_syncs"] = torch.tensor(stats["syncs"])
        out[f"{name}_at_switch"] = flat(train(outer, rank, range(switch), momentum=0.9)[0])
        m = make_model()
        o = sgd(m, 0.9)
        train(A.MiniBatchSGD(), rank, range(switch), model=m, opt=o)
        train(dataclasses.replace(outer, switch_step=0), rank, range(switch, 20), model=m, opt=o)
        out[f"{name}_from_the_switched_model"] = flat(m)

    out["local_h4"] = flat(train(A.LocalSGD(period=4), rank, steps, momentum=0.9)[0])
    out["slowmo_plain"] = flat(
        train(A.SlowMo(period=4, outer_momentum=0.0, outer_lr=1.0), rank, steps, momentum=0.9)[0]
    )
    out["diloco_plain"] = flat(
        train(A.DiLoCo(period=4, outer_lr=1.0, outer_momentum=0.0), rank, steps, momentum=0.9)[0]
    )
    out["hier_one_block"] = flat(
        train(A.HierarchicalLocalSGD(period=2, block_period=2, block_size=world), rank, steps, momentum=0.9)[
            0
        ]
    )
    out["local_h2"] = flat(train(A.LocalSGD(period=2), rank, steps, momentum=0.9)[0])

    # Gradient accumulation over k micro-batches = mini-batch SGD on their concatenation.
    k = 3
    out["accumulation"] = flat(
        train(
            A.GradientAccumulation(steps=k),
            rank,
            range(6 * k),
            momentum=0.9,
            batch_fn=lambda r, s: batch(r, s, 2),
        )[0]
    )

    def joined(r: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(batch(r, s * k + i, 2) for i in range(k)))
        return torch.cat(xs), torch.cat(ys)

    out["minibatch_joined"] = flat(train(A.MiniBatchSGD(), rank, range(6), momentum=0.9, batch_fn=joined)[0])
    return out


# -- every registered algorithm, syncing within a few steps ------------------------------------

FAST = {"period": 4, "block_period": 2, "steps": 3, "switch_step": 7, "order": "round_robin"}
"""Small values for the period-like fields (by their paper names), so that a test of a few
dozen steps sees every kind of sync; a parameter server's pushes in a fixed order, so that
runs are deterministic."""


def fast_spec(name: str) -> dict[str, Any]:
    """Algorithm ``name`` with its defaults, every period-like field made small: the config
    generic tests run for every registered algorithm, a new one included."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(A.get(name))}  # type: ignore[arg-type]
    return {"name": name, **{k: v for k, v in FAST.items() if k in fields}}


# -- consistency and counters -----------------------------------------------------------------

STEPS = 12


def consistency_configs(world: int) -> dict[str, A.AlgorithmConfig]:
    return {
        "minibatch_sgd": A.MiniBatchSGD(),
        "gradient_accumulation": A.GradientAccumulation(steps=3),
        "local_sgd": A.LocalSGD(period=4),
        "post_local_sgd": A.PostLocalSGD(switch_step=4, period=3),
        "hierarchical_local_sgd": A.HierarchicalLocalSGD(period=2, block_period=2, block_size=2),
        "slowmo": A.SlowMo(period=4, outer_momentum=0.5),
        "diloco": A.DiLoCo(period=4),
        "sma": A.SMA(),
        "slowmo_switched": A.SlowMo(period=3, outer_momentum=0.5, switch_step=4),
        "diloco_switched": A.DiLoCo(period=3, switch_step=4),
    }


def _gather(vec: torch.Tensor, world: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(parts, vec)
    return parts


def consistency(rank: int, world: int) -> dict[str, Any]:
    """Per algorithm and step: which ranks hold bit-identical parameters, the counters, and
    how many times ``torch.distributed.all_reduce`` was really called."""
    real_calls = {"all_reduce": 0}
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        real_calls["all_reduce"] += 1
        return original(*args, **kwargs)

    out: dict[str, Any] = {}
    for mixed in (False, True):
        for name, algo in consistency_configs(world).items():
            model = make_model(extra_f64=mixed)
            opt = sgd(model, 0.9)
            per_step = []
            with localsgd.DataParallel(model, opt, algo) as dp:
                for step in range(STEPS):
                    before = real_calls["all_reduce"]
                    dist.all_reduce = counting  # type: ignore[assignment]
                    try:
                        loss_step(model, opt, *batch(rank, step))
                    finally:
                        dist.all_reduce = original
                    params = _gather(flat(model), world)
                    entry: dict[str, Any] = {
                        "equal": [bool(torch.equal(params[0], p)) for p in params],
                        "stats": {k: v for k, v in dp.stats.items() if k != "by_scope"},
                        "by_scope": dp.stats["by_scope"],
                        "real_all_reduce": real_calls["all_reduce"] - before,
                    }
                    if name == "sma":
                        central = torch.cat([z.reshape(-1).double() for z in dp._sync.central])  # type: ignore[union-attr]
                        entry["central_equal"] = [
                            bool(torch.equal(central, c)) for c in _gather(central, world)
                        ]
                    if name == "hierarchical_local_sgd":
                        entry["equal_pairs"] = [
                            bool(torch.equal(params[i], params[i ^ 1])) for i in range(world)
                        ]
                    per_step.append(entry)
            final = _gather(flat(model), world)
            out[(name, mixed)] = {
                "steps": per_step,
                "final_equal": all(torch.equal(final[0], f) for f in final),
                "numel": {
                    str(dt): sum(p.numel() for p in model.parameters() if p.dtype == dt)
                    for dt in {p.dtype for p in model.parameters()}
                },
            }
    return out


def batchnorm_buffers(rank: int, world: int) -> list[dict[str, Any]]:
    """Local SGD (H=3) on a model with BatchNorm: per step, whether every rank holds the same
    running statistics; then the same after exit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, OUT))
    opt = sgd(model, 0.9)
    out = []
    with localsgd.DataParallel(model, opt, A.LocalSGD(period=3)):
        for step in range(7):
            loss_step(model, opt, *batch(rank, step))
            stats = torch.cat([model[1].running_mean, model[1].running_var]).double()
            out.append({"equal": all(torch.equal(stats, s) for s in _gather(stats, world))})
    stats = torch.cat([model[1].running_mean, model[1].running_var]).double()
    out.append({"equal": all(torch.equal(stats, s) for s in _gather(stats, world))})
    return out


# -- resume -----------------------------------------------------------------------------------

RESUME_STEPS = 14
RESUME_AT = 7


def resume_configs(world: int) -> dict[str, A.AlgorithmConfig]:
    """Every registered algorithm (a new one too), plus the optimizer-state variants.
    Asynchronous algorithms refuse to resume from per-rank checkpoints (their own test)."""
    configs = {name: A.build(fast_spec(name)) for name in A.names() if not A.get(name).asynchronous}
    configs["local_sgd_avg_state"] = A.LocalSGD(period=4, optimizer_state="average")
    configs["local_sgd_reset_state"] = A.LocalSGD(period=4, optimizer_state="reset")
    configs["diloco_adamw"] = A.DiLoCo(period=4)
    # Switched before the checkpoint, one outer step taken: anchor and momentum are the
    # switch's, not the initial model's.
    configs["slowmo_switched_early"] = A.SlowMo(period=4, outer_momentum=0.5, switch_step=2)
    configs["diloco_switched_early"] = A.DiLoCo(period=4, switch_step=2)
    return configs


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "diloco_adamw":  # the paper's inner optimizer: Adam state must resume too
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return sgd(model, 0.9)


def resume_first(rank: int, world: int, folder: str) -> dict[str, Any]:
    out = {}
    for name, algo in resume_configs(world).items():
        model = make_model()
        opt = _optimizer(name, model)
        with localsgd.DataParallel(model, opt, algo) as dp:
            for step in range(RESUME_STEPS):
                loss_step(model, opt, *batch(rank, step))
                if step + 1 == RESUME_AT:
                    # Save a checkpoint mid-run (between syncs for most algorithms).
                    torch.save(
                        {"dp": dp.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()},
                        Path(folder) / f"{name}-rank{rank}.pt",
                    )
            stats = dict(dp.stats)
        out[name] = {"params": flat(model), "stats": stats}
    return out


def resume_second(rank: int, world: int, folder: str) -> dict[str, Any]:
    out = {}
    for name, algo in resume_configs(world).items():
        ckpt = torch.load(Path(folder) / f"{name}-rank{rank}.pt", weights_only=False)
        model = make_model(seed=123)  # a different init: everything must come from the checkpoint
        model.load_state_dict(ckpt["model"])
        opt = _optimizer(name, model)
        opt.load_state_dict(ckpt["opt"])
        with localsgd.DataParallel(model, opt, algo) as dp:
            dp.load_state_dict(ckpt["dp"])
            for step in range(RESUME_AT, RESUME_STEPS):
                loss_step(model, opt, *batch(rank, step))
            stats = dict(dp.stats)
        out[name] = {"params": flat(model), "stats": stats}
    return out


def amp_overflow_agreement(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 overflows at step 2; with dp.unscale_ every rank skips that step together."""
    model = make_model()
    opt = sgd(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    steps_taken = []
    with localsgd.DataParallel(model, opt, A.MiniBatchSGD()) as dp:
        for step in range(4):
            opt.zero_grad()
            x, y = batch(rank, step)
            if rank == 1 and step == 2:
                x = x * float("inf")
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            dp.unscale_(scaler)
            before = dp.stats["steps"]
            scaler.step(opt)
            scaler.update()
            steps_taken.append(dp.stats["steps"] - before)
        stats = dict(dp.stats)
    return {"steps_taken": steps_taken, "scale": scaler.get_scale(), "params": flat(model), "stats": stats}


# -- a workload in float64 ----------------------------------------------------------------------


def _cnn_float64() -> nn.Module:
    return mnist1d.ConvNet1D().double()


def mnist1d_cnn_float64(config: mnist1d.Mnist1dConfig) -> TensorWorkload:
    """``mnist1d_cnn`` in float64, data and model (the same initial values), as the import
    path ``scenarios:mnist1d_cnn_float64``: for whole runs compared across engines. In
    float32 the engines' kernels round differently (~1e-7), which is harmless until some
    pre-ReLU activation lies within that rounding of 0: its sign then differs between the
    engines, that replica's gradient by ~1e-2, and the runs part for good. In float64 such
    an activation would have to lie within ~1e-16 of 0."""
    arrays = mnist1d.load_arrays(config.num_samples, config.seed, config.data_path)
    return TensorWorkload(
        name="mnist1d_cnn_float64",
        num_classes=mnist1d.NUM_CLASSES,
        x_train=torch.as_tensor(arrays["x"], dtype=torch.float64),
        y_train=torch.as_tensor(arrays["y"], dtype=torch.long),
        x_test=torch.as_tensor(arrays["x_test"], dtype=torch.float64),
        y_test=torch.as_tensor(arrays["y_test"], dtype=torch.long),
        model_factory=_cnn_float64,
        recipe=mnist1d.CNN_RECIPE,
        config=dataclasses.asdict(config),
        train_error=config.train_error,
        validation_fraction=config.validation_fraction,
    )
