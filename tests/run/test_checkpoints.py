"""Mid-run checkpoints: a run interrupted after a checkpoint and resumed from it ends with
exactly the parameters and metrics rows of the uninterrupted run, for every algorithm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness import untimed_rows
from localsgd import algorithms, workloads
from localsgd.records import Store
from localsgd.run.checkpoints import CheckpointError, verify
from localsgd.run.config import run_config
from localsgd.run.execute import execute_run
from scenarios import fast_spec


class Interrupting:
    """A workload that raises KeyboardInterrupt (a Ctrl-C) when replica ``rank`` is about
    to take batch ``batch`` of epoch ``epoch``, once."""

    def __init__(self, inner: workloads.Workload, epoch: int, batch: int, rank: int = 0) -> None:
        self.inner = inner
        self.at = (epoch, batch, rank)
        self.fired = False

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def train_batches(self, rank, world_size, batch_size, epoch, seed, device):
        for i, data in enumerate(self.inner.train_batches(rank, world_size, batch_size, epoch, seed, device)):
            if (epoch, i, rank) == self.at and not self.fired:
                self.fired = True
                raise KeyboardInterrupt
            yield data


def config(algorithm: dict, engine: str = "simulated", workers: int = 4, **train) -> dict:
    return {
        "workers": workers,
        "engine": engine,
        "device": "cpu",
        "workload": {"name": "mnist1d_mlp", "num_samples": 1000},
        "algorithm": algorithm,
        # 800 training samples: 12 steps an epoch for every worker count below.
        "data": {"batch_size": 64 // workers},
        "train": {"epochs": 3, "max_steps": 24, "eval_every": 5, "checkpoint_every": 5, **train},
    }


def rows(run_dir: Path) -> list[dict]:
    return untimed_rows(run_dir)


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def interrupted_then_resumed(run, store: Store, epoch: int, batch: int) -> None:
    workload = workloads.build(run.workload)
    with pytest.raises(KeyboardInterrupt):
        execute_run(run, store, workload=Interrupting(workload, epoch, batch))
    partial = store.partial_dir(run.run_id())
    assert verify(partial, run.run_id()) is not None, "no checkpoint was taken before the interruption"
    assert execute_run(run, store, workload=workload, resume=True) == "completed"


@pytest.mark.parametrize("name", algorithms.names())
def test_a_resumed_run_ends_exactly_as_the_uninterrupted_one(tmp_path, name):
    spec = fast_spec(name)
    if name == "hierarchical_local_sgd":
        spec["block_size"] = 2
    run = run_config(config(spec))
    whole, resumed = Store(tmp_path / "whole"), Store(tmp_path / "resumed")
    assert execute_run(run, whole) == "completed"
    if run.steps_alone():
        # Workers that never wait for one another share no step to checkpoint at: the
        # interrupted run left none, and trains again from the start to the same end.
        workload = workloads.build(run.workload)
        with pytest.raises(KeyboardInterrupt):
            execute_run(run, resumed, workload=Interrupting(workload, 1, 6))
        assert verify(resumed.partial_dir(run.run_id()), run.run_id()) is None
        assert execute_run(run, resumed, workload=workload, resume=True) == "completed"
        a, b = whole.run_dir(run.run_id()), resumed.run_dir(run.run_id())
        assert all(torch.equal(v, final_model(b)[k]) for k, v in final_model(a).items())
        assert rows(a) == rows(b)
        assert json.loads((b / "status.json").read_text())["resumed"] == []
        return
    interrupted_then_resumed(run, resumed, epoch=1, batch=6)  # step 18, after a checkpoint

    a, b = whole.run_dir(run.run_id()), resumed.run_dir(run.run_id())
    expected, got = final_model(a), final_model(b)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert rows(a) == rows(b)  # no row lost, none twice
    assert [r["step"] for r in rows(b)] == [5, 10, 15, 20, 24]
    status = json.loads((b / "status.json").read_text())
    assert status["status"] == "completed" and len(status["resumed"]) == 1
    assert 5 <= status["resumed"][0] <= 18  # the last checkpoint before step 18
    whole_status = json.loads((a / "status.json").read_text())
    assert whole_status["resumed"] == []
    for key in ("steps", "samples", "best", "total_steps"):
        assert status[key] == whole_status[key], key
    assert status["counters"]["syncs"] == whole_status["counters"]["syncs"]
    assert status["counters"]["bytes"] == whole_status["counters"]["bytes"]
    assert not (b / "checkpoints").exists()  # a finished run keeps no checkpoints


def test_checkpoints_are_taken_at_a_sync_and_only_the_last_is_kept(tmp_path):
    run = run_config(config({"name": "local_sgd", "period": 4}, max_steps=30))
    store = Store(tmp_path / "store")
    workload = workloads.build(run.workload)
    with pytest.raises(KeyboardInterrupt):
        execute_run(run, store, workload=Interrupting(workload, epoch=2, batch=3))  # step 25
    folder = store.partial_dir(run.run_id()) / "checkpoints"
    # checkpoint_every = 5: the first sync (every 4th step) at or after 5 (8), at or
    # after 13 (16), at or after 21 (24).
    latest = json.loads((folder / "latest.json").read_text())
    assert latest == {"step": 24, "world_size": 1, "run_id": run.run_id()}
    assert sorted(p.name for p in folder.glob("*.pt")) == ["step24-rank0.pt"]
    state = torch.load(folder / "step24-rank0.pt", weights_only=True)
    # 11 steps an epoch (the training data less its validation split): step 24 is batch 2 of epoch 2.
    assert (state["step"], state["epoch"], state["batch"]) == (24, 2, 2)
    assert [r["step"] for r in state["rows"]] == [5, 10, 15, 20]
    # The rows written after the checkpoint (step 25) are dropped when it resumes.
    assert [r["step"] for r in rows(store.partial_dir(run.run_id()))] == [5, 10, 15, 20, 25]
    assert execute_run(run, store, workload=workload, resume=True) == "completed"
    assert [r["step"] for r in rows(store.run_dir(run.run_id()))] == [5, 10, 15, 20, 25, 30]


def test_a_one_process_run_resumes_in_this_process(tmp_path):
    run = run_config(config({"name": "local_sgd", "period": 2}, engine="processes", workers=1))
    whole, resumed = Store(tmp_path / "whole"), Store(tmp_path / "resumed")
    assert execute_run(run, whole) == "completed"
    interrupted_then_resumed(run, resumed, epoch=1, batch=9)
    expected, got = final_model(whole.run_dir(run.run_id())), final_model(resumed.run_dir(run.run_id()))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert rows(whole.run_dir(run.run_id())) == rows(resumed.run_dir(run.run_id()))


def test_a_corrupt_checkpoint_is_named_with_what_to_do(tmp_path):
    run = run_config(config({"name": "minibatch_sgd"}))
    store = Store(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        execute_run(run, store, workload=Interrupting(workloads.build(run.workload), 1, 0))
    partial = store.partial_dir(run.run_id())
    (pt,) = (partial / "checkpoints").glob("*.pt")
    pt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"checkpoint {pt} is unreadable .*; delete .*checkpoints to start"):
        verify(partial, run.run_id())
    (partial / "checkpoints" / "latest.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"latest\.json is unreadable"):
        verify(partial, run.run_id())
    other = run_config(config({"name": "minibatch_sgd"}, max_steps=23))
    (partial / "checkpoints" / "latest.json").unlink()
    assert verify(partial, other.run_id()) is None  # no checkpoint: nothing to verify


def test_operational_settings_are_not_part_of_the_run_id():
    base = run_config(config({"name": "minibatch_sgd"}))
    changed = run_config(config({"name": "minibatch_sgd"}, checkpoint_every=0, timeout_seconds=30, max_restarts=2))
    assert base.run_id() == changed.run_id()
    assert base.run_id() != run_config(config({"name": "minibatch_sgd"}, max_steps=23)).run_id()



class LoudLoss:
    """A workload whose loss is multiplied by 1000: its fp16 gradients overflow at the
    initial loss scale until the scaler has halved it several times."""

    def __init__(self, inner: workloads.Workload) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def loss(self, model, batch):
        return 1000.0 * self.inner.loss(model, batch)


def test_an_fp16_run_resumes_with_its_loss_scale(tmp_path):
    """train.precision = "fp16": the GradScaler's scale (halved at every overflow while it
    settles) comes back with the checkpoint; a fresh scale would skip other steps."""
    spec = config({"name": "local_sgd", "period": 2}, precision="fp16")
    run = run_config({**spec, "optimizer": {"lr": 1e-4}})  # the loss is 1000 times larger
    whole, resumed = Store(tmp_path / "whole"), Store(tmp_path / "resumed")
    workload = LoudLoss(workloads.build(run.workload))
    assert execute_run(run, whole, workload=workload) == "completed"
    with pytest.raises(KeyboardInterrupt):
        execute_run(run, resumed, workload=Interrupting(workload, epoch=1, batch=6))
    partial = resumed.partial_dir(run.run_id())
    (saved,) = (partial / "checkpoints").glob("*.pt")
    scaler = torch.load(saved, weights_only=True)["scaler"]
    assert scaler["scale"] < 2.0**16  # it overflowed: not the initial scale
    assert execute_run(run, resumed, workload=workload, resume=True) == "completed"
    expected, got = final_model(whole.run_dir(run.run_id())), final_model(resumed.run_dir(run.run_id()))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert rows(whole.run_dir(run.run_id())) == rows(resumed.run_dir(run.run_id()))
