"""Mixed precision: a step a ``GradScaler`` skips still counts toward the algorithm's
schedule (real gloo, 3 processes; the run loop under ``train.precision = "fp16"``), and
bf16 parameters are averaged in fp32, rounded once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import localsgd
from harness import run_world, untimed_rows
from localsgd import algorithms, workloads
from localsgd.comm.process_group import ProcessGroupCommunicator
from localsgd.engines.simulated.communicator import SimulatedCommunicator
from localsgd.run.config import run_config

# One worker runs the module, so that the launch behind its module fixture runs once per session.
pytestmark = pytest.mark.xdist_group("mixed_precision")

WORLD = 3  # three ranks: a sum of three bf16 values rounds twice, a sum of two exactly once
STEPS = 6
SKIPPED = 2  # 0-based: the 3rd step, at which H = 3 makes a sync due
ALGORITHMS = {
    "local_sgd": algorithms.LocalSGD(period=3),
    "diloco": algorithms.DiLoCo(period=3, outer_lr=0.7, outer_momentum=0.9),
    "minibatch_sgd": algorithms.MiniBatchSGD(),
}
# How each run steps: the fp32 reference (the skipped step's gradient zeroed on every rank:
# SGD without momentum then leaves the model as a skip does), dp.step(scaler), a scaler
# handed to DataParallel and stepped by other code, a wrapper that drives the scaler
# (accelerate's AcceleratedOptimizer), and scaler.step alone, as before this was handled.
PATHS = ("fp32", "dp_step", "watched", "wrapper", "unhandled")
LOOP_WORKLOAD = {"name": "mnist1d_mlp", "num_samples": 400}


class DrivingWrapper:
    """Steps its inner optimizer through its scaler, as accelerate's optimizer does."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer = optimizer
        self.scaler = scaler

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _train(rank: int, name: str, path: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Scales that are powers of two (1, then 0.5 after the skip) keep the scaled run exact.
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000)
    wrapper = DrivingWrapper(opt, scaler)
    data = torch.Generator().manual_seed(100 + rank)
    syncs, steps, trace, applied = [], [], [], []
    handed = {"scaler": scaler} if path == "watched" else {}
    with localsgd.DataParallel(
        model, wrapper if path == "wrapper" else opt, ALGORITHMS[name], **handed
    ) as dp:
        for step in range(STEPS):
            opt.zero_grad()
            x = torch.randn(5, 4, generator=data)
            loss = model(x).pow(2).mean()
            (loss if path == "fp32" else scaler.scale(loss)).backward()
            if step == SKIPPED:
                if path == "fp32":
                    model.weight.grad.zero_()
                    model.bias.grad.zero_()
                elif rank == 1:
                    model.weight.grad[0, 0] = float("inf")  # one rank overflows
            if path == "fp32":
                opt.step()
            elif path == "dp_step":
                applied.append(dp.step(scaler))  # unscales first, agreeing across ranks
                scaler.update()
            elif path == "watched":
                scaler.step(opt)
                scaler.update()
            elif path == "wrapper":
                wrapper.step()
            else:
                dp.unscale_(scaler)  # every rank skips, so the collectives still pair up
                scaler.step(opt)
                scaler.update()
            syncs.append(dp.stats["syncs"])
            steps.append(dp.stats["steps"])
            trace.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    return {
        "syncs": syncs,
        "steps": steps,
        "trace": trace,
        "final": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "scale": scaler.get_scale(),
        "patched": "update" in scaler.__dict__ or "unscale_" in scaler.__dict__,
        "applied": applied,
    }


def _bf16(rank: int) -> dict[str, Any]:
    values = torch.randn(4096, generator=torch.Generator().manual_seed(rank)).bfloat16()
    comm = ProcessGroupCommunicator()
    averaged = values.clone()
    comm.average([averaged])
    every = [torch.empty(4096) for _ in range(WORLD)]
    dist.all_gather(every, values.float())
    summed_in_bf16 = values.clone()
    dist.all_reduce(summed_in_bf16)  # what the collective did on bf16 tensors before
    summed_in_bf16.mul_(1.0 / WORLD)
    # A training run: local SGD on a bf16 model and on the fp32 model with the same
    # (bf16-representable) initial parameters and data.
    finals = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4).to(torch.bfloat16).to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(200 + rank)
        with localsgd.DataParallel(model, opt, algorithms.LocalSGD(period=2)) as dp:
            for _ in range(6):
                opt.zero_grad()
                model(torch.randn(16, 8, generator=data).to(dtype)).pow(2).mean().backward()
                opt.step()
        finals[str(dtype)] = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
        finals[f"{dtype} bytes"] = dp.stats["bytes"]
        finals[f"{dtype} numel"] = sum(p.numel() for p in model.parameters())
    return {
        "averaged": averaged,
        "exact": torch.stack(every).mean(0).bfloat16(),
        "summed_in_bf16": summed_in_bf16,
        "bytes": comm.stats.bytes,
        "runs": finals,
    }


class Overflowing:
    """A workload whose loss, on ``rank``, is 10^4 times larger at its ``at``-th training
    step: finite (no divergence), but its fp16 gradients overflow at the initial scale."""

    def __init__(self, inner: Any, rank: int, at: int) -> None:
        self.inner = inner
        self.loud = at if rank == 1 else 0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = self.inner.loss(model, batch)
        if not torch.is_grad_enabled():
            return loss  # an evaluation
        self.calls += 1
        return loss * 1e4 if self.calls == self.loud else loss


def _loop(rank: int, world_size: int, folder: str) -> dict[str, Any]:
    """The run loop on the process engine: fp32, and fp16 with rank 1 overflowing at step 3."""
    from localsgd.run.training import train

    rows = {}
    for precision in ("fp32", "fp16"):
        config = run_config(
            {
                "workers": world_size,
                "engine": "processes",
                "device": "cpu",
                "workload": LOOP_WORKLOAD,
                "algorithm": {"name": "local_sgd", "period": 3},
                "data": {"batch_size": 16},
                "train": {"epochs": 1, "max_steps": 7, "eval_every": 1, "precision": precision},
            }
        )
        run_dir = Path(folder) / precision if rank == 0 else None
        if run_dir is not None:
            run_dir.mkdir()
        loud = SKIPPED + 1 if precision == "fp16" else 0
        workload = Overflowing(workloads.build(config.workload), rank, at=loud)
        status = train(config, run_dir, rank, world_size, "gloo", workload=workload)
        assert status.status == "completed", status
        if run_dir is not None:
            rows[precision] = untimed_rows(run_dir)
    return rows


def _scenarios(rank: int, world_size: int, folder: str, cache: str) -> dict[str, Any]:
    os.environ["XDG_CACHE_HOME"] = cache
    runs = {
        (name, path): _train(rank, name, path)
        for name in ALGORITHMS
        for path in PATHS
        if not (path == "unhandled" and ALGORITHMS[name].capabilities.synchronous_baseline)
    }
    return {"runs": runs, "bf16": _bf16(rank), "loop": _loop(rank, world_size, folder)}


@pytest.fixture(scope="module")
def ranks(data_cache: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = data_cache
    try:
        workloads.build(LOOP_WORKLOAD)  # its data generated once, here, not in every rank
    finally:
        if previous is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = previous
    folder = tmp_path_factory.mktemp("mixed-precision")
    return run_world(_scenarios, WORLD, str(folder), data_cache, timeout=300)


# Syncs after each step: H = 3 averages after steps 3 and 6 (the 3rd is the skipped one);
# mini-batch SGD after every step but the skipped one, where every replica skipped and no
# gradient needed averaging.
EXPECTED_SYNCS = {
    "local_sgd": [0, 0, 1, 1, 1, 2],
    "diloco": [0, 0, 1, 1, 1, 2],
    "minibatch_sgd": [1, 2, 2, 3, 4, 5],
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("path", ["dp_step", "watched", "wrapper"])
def test_a_skipped_step_keeps_the_schedule_and_the_replicas_agreement(ranks, name, path):
    for r in ranks:
        run, fp32 = r["runs"][(name, path)], r["runs"][(name, "fp32")]
        assert run["steps"] == list(range(1, STEPS + 1))  # the skipped step is counted
        assert run["syncs"] == EXPECTED_SYNCS[name]
        assert run["scale"] == 0.5  # the scaler did skip (and backed off) once
        assert not run["patched"]  # the scaler is the user's own again after the block
        if path == "dp_step":
            assert run["applied"] == [step != SKIPPED for step in range(STEPS)]
        # The skipped step is the fp32 step with no update: the same model, step by step.
        for a, b in zip(run["trace"], fp32["trace"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    first = ranks[0]["runs"][(name, path)]
    synced = [i for i, n in enumerate(first["syncs"]) if n > (first["syncs"][i - 1] if i else 0)]
    for r in ranks[1:]:  # identical on every rank right after each sync, and at the end
        run = r["runs"][(name, path)]
        assert all(torch.equal(run["trace"][i], first["trace"][i]) for i in synced)
        assert torch.equal(run["final"], first["final"])


def test_the_fp32_runs_sync_on_schedule(ranks):
    for name in ("local_sgd", "diloco"):
        assert ranks[0]["runs"][(name, "fp32")]["syncs"] == EXPECTED_SYNCS[name]
    assert ranks[0]["runs"][("minibatch_sgd", "fp32")]["syncs"] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("name", ["local_sgd", "diloco"])
def test_without_handling_the_skipped_step_shifts_the_schedule(ranks, name):
    """What the tests above guard against: scaler.step alone never reaches the optimizer's
    hooks, so the step is lost and the due sync comes a step late."""
    run = ranks[0]["runs"][(name, "unhandled")]
    assert run["steps"][-1] == STEPS - 1
    assert run["syncs"] == [0, 0, 0, 1, 1, 1]


def test_bf16_is_averaged_in_fp32_and_rounded_once(ranks):
    for r in ranks:
        got = r["bf16"]
        assert got["averaged"].dtype == torch.bfloat16
        assert torch.equal(got["averaged"], got["exact"])
        assert got["bytes"] == 4096 * 4  # the wire carries fp32
    # Summed in bf16 the mean is rounded after each addition and again after the scaling:
    # a real difference, in a good share of the elements.
    naive, exact = ranks[0]["bf16"]["summed_in_bf16"], ranks[0]["bf16"]["exact"]
    wrong = (naive != exact).float().mean().item()
    assert wrong > 0.05, wrong


def test_a_bf16_model_trains_as_the_fp32_one_within_bf16_rounding(ranks):
    for r in ranks:
        runs = r["bf16"]["runs"]
        bf16, fp32 = runs[str(torch.bfloat16)], runs[str(torch.float32)]
        # 6 SGD steps from the same start: bf16's 8-bit mantissa (relative 2^-8) bounds it.
        torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-2)
        # Both carried fp32 on the wire: the same bytes for the same syncs.
        assert (
            runs[f"{torch.bfloat16} bytes"]
            == runs[f"{torch.float32} bytes"]
            == 3 * 4 * runs[f"{torch.float32} numel"]
        )
    for r in ranks[1:]:
        assert torch.equal(
            r["bf16"]["runs"][str(torch.bfloat16)], ranks[0]["bf16"]["runs"][str(torch.bfloat16)]
        )


def test_the_simulated_engine_averages_bf16_as_the_process_engine(ranks):
    stacked = torch.stack(
        [torch.randn(4096, generator=torch.Generator().manual_seed(r)).bfloat16() for r in range(WORLD)]
    )
    comm = SimulatedCommunicator(WORLD)
    comm.average([stacked])
    for r in range(WORLD):
        assert torch.equal(stacked[r], ranks[0]["bf16"]["averaged"])
    assert comm.stats.bytes == 4096 * 4


def test_the_run_loop_counts_a_skipped_fp16_step(ranks):
    """train.precision = "fp16", rank 1 overflowing at step 3 (every rank skips it): the rows'
    syncs, updates and traffic at every step are the fp32 run's."""
    rows = ranks[0]["loop"]
    for key in ("step", "syncs", "updates", "collectives", "bytes"):
        assert [row[key] for row in rows["fp16"]] == [row[key] for row in rows["fp32"]], key
    # 6 steps (an epoch of 320 samples at 3 x 16), H = 3: syncs after steps 3 and 6.
    assert [row["step"] for row in rows["fp16"]] == [1, 2, 3, 4, 5, 6]
    assert [row["syncs"] for row in rows["fp16"]] == [0, 0, 1, 1, 1, 2]
    assert rows["fp16"][2]["train_loss"] > 1000  # step 3 was loud on rank 1 ...
    assert rows["fp16"][3]["train_loss"] < 10  # ... and its overflowing update was skipped


def test_accelerates_optimizer_drives_the_scaler_and_the_schedule_holds():
    """accelerate's ``AcceleratedOptimizer`` (a world of one: accelerate gives no scaler to
    fp16 on the CPU, so one is handed to it) calls ``scaler.step`` and ``scaler.update``
    itself; ``DataParallel`` takes the scaler from it and counts the step it skips."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    Accelerator(cpu=True)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        opt = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), False, scaler)
        seen = []
        with localsgd.DataParallel(model, opt, ALGORITHMS["diloco"]) as dp:
            for step in range(STEPS):
                opt.zero_grad()
                scaler.scale(model(torch.randn(5, 4)).pow(2).mean()).backward()
                if step == SKIPPED:
                    model.weight.grad[0, 0] = float("inf")
                opt.step()
                seen.append((opt.step_was_skipped, dp.stats["steps"], dp.stats["syncs"]))
        assert seen == [(s == SKIPPED, s + 1, EXPECTED_SYNCS["diloco"][s]) for s in range(STEPS)]
        assert "update" not in scaler.__dict__ and "unscale_" not in scaler.__dict__
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_scaler_that_is_not_a_gradscaler_and_a_step_outside_the_block_are_refused():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"scaler must be a torch\.amp\.GradScaler, got str"):
        localsgd.DataParallel(model, opt, ALGORITHMS["local_sgd"], scaler="fp16")
    dp = localsgd.DataParallel(model, opt, ALGORITHMS["local_sgd"])
    with pytest.raises(RuntimeError, match=r"step\(\) needs an entered DataParallel"):
        dp.step(torch.amp.GradScaler("cpu"))


def _skip_second_of_four(
    algorithm: Any,
) -> tuple[list[tuple[int, int]], list[torch.Tensor], list[torch.Tensor]]:
    """Four steps of a linear model in a world of one, the 2nd skipped by the scaler: each
    step's (steps, syncs), parameters and gradients (as unscaled before the step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    seen, params, grads = [], [], []
    with localsgd.DataParallel(model, opt, algorithm) as dp:
        for step in range(4):
            opt.zero_grad()
            scaler.scale(model(torch.randn(4, 3)).pow(2).mean()).backward()
            if step == 1:
                model.weight.grad[0, 0] = float("nan")
            grads.append(model.weight.grad / scaler.get_scale())
            dp.step(scaler)
            scaler.update()
            seen.append((dp.stats["steps"], dp.stats["syncs"]))
            params.append(model.weight.detach().clone())
    return seen, params, grads


def test_gradient_accumulation_drops_the_update_a_skipped_kth_micro_batch_held():
    seen, params, grads = _skip_second_of_four(algorithms.GradientAccumulation(steps=2))
    # Micro-batches 1-2 (the 2nd skipped) apply nothing; 3-4 apply their mean, one sync.
    assert seen == [(1, 0), (2, 0), (3, 0), (4, 1)]
    assert torch.equal(params[1], params[0]) and torch.equal(params[2], params[0])
    torch.testing.assert_close(params[3], params[0] - 0.1 * (grads[2] + grads[3]) / 2)


def test_sma_takes_its_elastic_step_at_a_skipped_step():
    seen, _, _ = _skip_second_of_four(algorithms.SMA())
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)]  # an averaging at every step, skipped or not
