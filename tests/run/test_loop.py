"""One training loop: a single run and a batch of trials go through the same
:class:`TrainingLoop`, and what differs between runs plugs in as a strategy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from localsgd import engines
from localsgd.distributed import resolve_device
from localsgd.records.record import RunWriter
from localsgd.run.checkpoints import Checkpoints
from localsgd.run.config import RunConfig, run_config
from localsgd.run.loop import Synchronous, TrainingLoop
from localsgd.run.training import SingleRun, train
from localsgd.run.trials import train_trials

pytestmark = pytest.mark.timeout(300)


def config(name: str = "one", seed: int = 3, **train_section: Any) -> RunConfig:
    return run_config(
        {
            "name": name,
            "workload": {"name": "mnist1d_cnn", "num_samples": 1000},
            "workers": 2,
            "engine": "simulated",
            "seed": seed,
            "algorithm": {"name": "local_sgd", "period": 2},
            "data": {"batch_size": 16},
            "optimizer": {"lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4},
            "schedule": {"name": "cosine"},
            "train": {"epochs": 10, "max_steps": 8, "eval_every": 3, **train_section},
        }
    )


def rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_run_and_a_batch_of_one_trial_write_the_same_rows_through_one_loop(tmp_path, monkeypatch, data_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    seen: list[tuple[str, str]] = []
    run_loop = TrainingLoop.run

    def spy(self: TrainingLoop) -> Any:
        seen.append((type(self.runs).__name__, type(self.evaluation).__name__))
        return run_loop(self)

    monkeypatch.setattr(TrainingLoop, "run", spy)
    alone, batched = tmp_path / "alone", tmp_path / "batched"
    alone.mkdir()
    batched.mkdir()
    c = config()
    status = train(c, alone, 0, 1)
    (trial_status,) = train_trials([c], [batched])
    assert seen == [("SingleRun", "Synchronous"), ("BatchedTrials", "Synchronous")]
    assert status.status == trial_status.status == "completed"
    ours, theirs = rows(alone), rows(batched)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [3, 6, 8]
    for a, b in zip(ours, theirs):
        for key in ("step", "epoch", "samples", "syncs", "collectives", "bytes", "updates"):
            assert a[key] == b[key], key
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        # ReplicaSGD steps the batch, torch's SGD the run: equal to float rounding.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-5)
    assert (
        (status.steps, status.counters.syncs) == (trial_status.steps, trial_status.counters.syncs) == (8, 4)
    )


class AtSteps:
    """A test's own evaluation strategy: evaluate after the steps listed, the workers' mean
    loss as :class:`Synchronous` records it."""

    evaluates = True

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.finished_after: int | None = None

    def due(self, loop: TrainingLoop) -> bool:
        return loop.step in self.steps

    def train_loss(self, replicas: Any, loop: TrainingLoop, mean: Any, steps: Any) -> tuple[float, int]:
        return Synchronous().train_loss(replicas, loop, mean, steps)

    def finish(self, loop: TrainingLoop, waited: float) -> None:
        self.finished_after = loop.step


class Traced:
    """A test's own :class:`~localsgd.run.loop.Runs`: a single run whose stages are listed
    as the loop calls them."""

    STAGES = ("begin", "set_lr", "optimizer_step", "end_training", "evaluate", "checkpoint", "finish")

    def __init__(self, inner: SingleRun) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in self.STAGES:
            return attribute

        def traced(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attribute(*args, **kwargs)

        return traced


def single_run(c: RunConfig, folder: Path) -> tuple[SingleRun, RunWriter]:
    writer = RunWriter(folder)
    saved = Checkpoints(None, 0, 1, 0, c.run_id())
    device = resolve_device(c.device)
    return SingleRun(c, engines.get(c.engine), writer, 0, 1, device, None, saved), writer


def test_strategies_of_a_tests_own_plug_into_the_loop(tmp_path, monkeypatch, data_cache):
    """Neither strategy is in loop.py: an evaluation at chosen steps and a run that lists
    its stages. The rows at those steps hold the model a run evaluating every step has
    there, and the train loss over the steps since the last evaluation."""
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    every = tmp_path / "every"
    every.mkdir()
    train(config(eval_every=1), every, 0, 1)
    reference = {r["step"]: r for r in rows(every)}
    assert sorted(reference) == list(range(1, 9))

    chosen = tmp_path / "chosen"
    chosen.mkdir()
    run, writer = single_run(config(), chosen)
    traced = Traced(run)
    at = AtSteps({2, 5})
    try:
        (status,) = TrainingLoop(traced, at).run()  # type: ignore[arg-type]
    finally:
        writer.close()
    assert at.finished_after == 8 and status.steps == 8
    got = rows(chosen)
    assert [r["step"] for r in got] == [2, 5]
    for r in got:
        assert r["metrics"] == pytest.approx(reference[r["step"]]["metrics"], rel=1e-6)
    since = [reference[s]["train_loss"] for s in (3, 4, 5)]
    assert got[1]["train_loss"] == pytest.approx(sum(since) / 3, rel=1e-6)
    # The loop's order: each step's rate and optimizer step; an evaluation when due, then
    # a checkpoint chance after every step but the last; the workers end before finishing.
    step = ["set_lr", "optimizer_step"]
    expected = ["begin"]
    for s in range(1, 9):
        expected += step + (["end_training"] if s == 8 else []) + (["evaluate"] if s in at.steps else [])
        expected += ["checkpoint"] if s < 8 else []
    assert traced.calls == [*expected, "finish"]


def test_a_loop_ends_when_every_trial_has_stopped(tmp_path, monkeypatch, data_cache):
    """A trial that crosses train.stop_at finishes there; when all have, the loop ends
    before its last step."""
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    c = config(stop_at="eval_loss=100", stop_split="test")  # crossed at the first evaluation
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    second = config("two", 4, stop_at="eval_loss=100", stop_split="test")
    steps: list[int] = []
    step = TrainingLoop.train_step

    def counted(self: TrainingLoop, data: Any) -> None:
        steps.append(self.step)
        step(self, data)

    monkeypatch.setattr(TrainingLoop, "train_step", counted)
    statuses = train_trials([c, second], folders)
    assert steps == [0, 1, 2]  # of 8
    assert [s.status for s in statuses] == ["completed", "completed"]
    assert [s.steps for s in statuses] == [3, 3]
    assert [[r["step"] for r in rows(f)] for f in folders] == [[3], [3]]
    assert [torch.load(f / "checkpoint.pt")["step"] for f in folders] == [3, 3]
