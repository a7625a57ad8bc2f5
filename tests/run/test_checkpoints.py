"""Mid-run checkpoints: a run interrupted after a checkpoint and resumed from it ends with
exactly the parameters and metrics rows of the uninterrupted run, for every algorithm."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from harness import untimed_rows
from localsgd import algorithms, workloads
from localsgd.records import Store
from localsgd.run.checkpoints import CheckpointError, Checkpoints, verify
from localsgd.run.config import run_config
from localsgd.run.execute import execute_run
from scenarios import fast_spec

# One xdist worker runs this module, so its whole run is built once per session, not once per worker.
pytestmark = pytest.mark.xdist_group("checkpoints")


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


def test_checkpoints_are_taken_at_a_sync_and_the_last_two_are_kept(tmp_path):
    run = run_config(config({"name": "local_sgd", "period": 4}, max_steps=30))
    store = Store(tmp_path / "store")
    workload = workloads.build(run.workload)
    with pytest.raises(KeyboardInterrupt):
        execute_run(run, store, workload=Interrupting(workload, epoch=2, batch=3))  # step 25
    folder = store.partial_dir(run.run_id()) / "checkpoints"
    # checkpoint_every = 5: the first sync (every 4th step) at or after 5 (8), at or
    # after 13 (16), at or after 21 (24).
    latest = json.loads((folder / "latest.json").read_text())
    digest = latest.pop("files")["step24-rank0.pt"]
    assert latest == {"step": 24, "world_size": 1, "run_id": run.run_id()}
    assert digest["bytes"] == (folder / "step24-rank0.pt").stat().st_size
    assert digest["sha256"] == hashlib.sha256((folder / "step24-rank0.pt").read_bytes()).hexdigest()
    assert json.loads((folder / "previous.json").read_text())["step"] == 16
    # Two generations, no more: step 8's file went when step 24's was written.
    assert sorted(p.name for p in folder.glob("*")) == [
        "latest.json",
        "previous.json",
        "step16-rank0.pt",
        "step24-rank0.pt",
    ]
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


def test_a_checkpoint_of_another_run_is_named_with_what_to_do(tmp_path):
    run = run_config(config({"name": "minibatch_sgd"}))
    store = Store(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        execute_run(run, store, workload=Interrupting(workloads.build(run.workload), 1, 0))
    partial = store.partial_dir(run.run_id())
    other = run_config(config({"name": "minibatch_sgd"}, max_steps=23))
    step = json.loads((partial / "checkpoints" / "latest.json").read_text())["step"]
    pt = partial / "checkpoints" / f"step{step}-rank0.pt"
    with pytest.raises(
        CheckpointError, match=rf"checkpoint {pt} belongs to run .*; delete .*checkpoints to start"
    ):
        verify(partial, other.run_id())
    (partial / "checkpoints" / "latest.json").unlink()
    assert verify(partial, other.run_id()) is None  # no checkpoint: nothing to verify


# -- a bad latest checkpoint: the previous one is resumed from --------------------------


def spoil(folder: Path, how: str) -> Path:
    """Spoil the latest checkpoint in ``folder`` (step 24) as a crash or a bad disk would;
    returns the file spoiled."""
    pt = folder / "step24-rank0.pt"
    if how == "truncated":
        pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
        return pt
    if how == "garbage":  # the same size: only the checksum tells
        pt.write_bytes(bytes(reversed(pt.read_bytes())))
        return pt
    if how == "not a checkpoint":  # unchecked by latest.json (an older layout): torch.load tells
        latest = json.loads((folder / "latest.json").read_text())
        del latest["files"]
        (folder / "latest.json").write_text(json.dumps(latest))
        pt.write_bytes(b"not a checkpoint")
        return pt
    assert how == "latest.json"
    (folder / "latest.json").write_text('{"step": 24, "world_')
    return folder / "latest.json"


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    run = run_config(config({"name": "local_sgd", "period": 4}, max_steps=30))
    store = Store(tmp_path_factory.mktemp("whole"))
    assert execute_run(run, store) == "completed"
    return store.run_dir(run.run_id())


@pytest.mark.parametrize("how", ["truncated", "garbage", "not a checkpoint", "latest.json"])
def test_a_bad_latest_checkpoint_falls_back_to_the_previous_one_exactly(tmp_path, caplog, whole_run, how):
    run = run_config(config({"name": "local_sgd", "period": 4}, max_steps=30))
    store = Store(tmp_path / "store")
    workload = workloads.build(run.workload)
    with pytest.raises(KeyboardInterrupt):
        execute_run(run, store, workload=Interrupting(workload, epoch=2, batch=3))  # step 25
    partial = store.partial_dir(run.run_id())
    bad = spoil(partial / "checkpoints", how)
    with caplog.at_level(logging.WARNING, logger="localsgd.run.checkpoints"):
        assert verify(partial, run.run_id()) == 16
        assert execute_run(run, store, workload=workload, resume=True) == "completed"
    said = [r.getMessage() for r in caplog.records if r.name == "localsgd.run.checkpoints"]
    assert len(said) == 1, said  # one line, though the run was checked, then resumed
    reason = {
        "truncated": r"is truncated \(\d+ of \d+ bytes\)",
        "garbage": r"is corrupt \(its SHA-256 is not the one latest\.json recorded\)",
        "not a checkpoint": r"is unreadable \(",
        "latest.json": r"is unreadable \(",
    }[how]
    assert re.fullmatch(
        rf"(checkpoint )?{re.escape(str(bad))} {reason}.*; resuming from the previous checkpoint, of step 16",
        said[0],
    )
    done = store.run_dir(run.run_id())
    assert json.loads((done / "status.json").read_text())["resumed"] == [16]
    expected, got = final_model(whole_run), final_model(done)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert rows(done) == rows(whole_run)


def test_with_no_good_checkpoint_left_the_run_starts_over(tmp_path, caplog, whole_run):
    run = run_config(config({"name": "local_sgd", "period": 4}, max_steps=30))
    store = Store(tmp_path / "store")
    workload = workloads.build(run.workload)
    with pytest.raises(KeyboardInterrupt):
        execute_run(run, store, workload=Interrupting(workload, epoch=2, batch=3))
    partial = store.partial_dir(run.run_id())
    spoil(partial / "checkpoints", "truncated")
    (partial / "checkpoints" / "step16-rank0.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="localsgd.run.checkpoints"):
        assert verify(partial, run.run_id()) is None
        assert execute_run(run, store, workload=workload, resume=True) == "completed"
    said = [r.getMessage() for r in caplog.records if r.name == "localsgd.run.checkpoints"]
    assert len(said) == 1 and said[0].endswith("no good checkpoint is left: the run starts again from step 0")
    assert "step24-rank0.pt is truncated" in said[0] and "step16-rank0.pt is truncated (0 of" in said[0]
    done = store.run_dir(run.run_id())
    assert json.loads((done / "status.json").read_text())["resumed"] == []
    expected, got = final_model(whole_run), final_model(done)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert rows(done) == rows(whole_run)


def two_ranks_saved(folder: Path, steps: tuple[int, ...]) -> list[Checkpoints]:
    """Checkpoints of a run of two processes taken at ``steps``, as its ranks take them
    (rank 1 reaches the barrier first: rank 0 describes both files after it)."""
    ranks = [Checkpoints(folder, rank, 2, 1, "run") for rank in (0, 1)]
    for step in steps:
        for saved in reversed(ranks):
            saved.save(
                {"step": step, "weights": torch.full((3,), float(step + saved.rank))}, barrier=lambda: None
            )
    return ranks


def test_a_missing_rank_file_makes_every_rank_fall_back_to_the_same_step(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    two_ranks_saved(folder, (3, 6, 9))
    assert sorted(p.name for p in folder.glob("*.pt")) == [
        "step6-rank0.pt",
        "step6-rank1.pt",
        "step9-rank0.pt",
        "step9-rank1.pt",
    ]
    (folder / "step9-rank1.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="localsgd.run.checkpoints"):
        states = [Checkpoints(folder, rank, 2, 1, "run").load() for rank in (0, 1)]
    assert [s["step"] for s in states] == [6, 6]
    assert torch.equal(states[1]["weights"], torch.full((3,), 7.0))
    said = [r.getMessage() for r in caplog.records if r.name == "localsgd.run.checkpoints"]
    assert said == [
        f"checkpoint {folder / 'step9-rank1.pt'} is missing; resuming from the previous checkpoint, of step 6"
    ]
    # Resumed from step 6, the next checkpoint drops step 9's remains and keeps step 6 as the previous one.
    ranks = [Checkpoints(folder, rank, 2, 1, "run") for rank in (0, 1)]
    for saved in ranks:
        saved.load()
    for saved in reversed(ranks):
        saved.save({"step": 8}, barrier=lambda: None)
    assert sorted(p.name for p in folder.glob("*.pt")) == [
        "step6-rank0.pt",
        "step6-rank1.pt",
        "step8-rank0.pt",
        "step8-rank1.pt",
    ]
    assert json.loads((folder / "previous.json").read_text())["step"] == 6
    assert json.loads((folder / "latest.json").read_text())["step"] == 8


def test_a_checkpoint_of_another_world_size_is_refused_not_skipped(tmp_path):
    folder = tmp_path / "checkpoints"
    two_ranks_saved(folder, (3,))
    with pytest.raises(
        CheckpointError,
        match=r"latest\.json was written by 2 worker process\(es\), and this run has 1; delete",
    ):
        Checkpoints(folder, 0, 1, 1, "run").load()


def test_operational_settings_are_not_part_of_the_run_id():
    base = run_config(config({"name": "minibatch_sgd"}))
    changed = run_config(
        config({"name": "minibatch_sgd"}, checkpoint_every=0, timeout_seconds=30, max_restarts=2)
    )
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
    step = json.loads((partial / "checkpoints" / "latest.json").read_text())["step"]
    saved = partial / "checkpoints" / f"step{step}-rank0.pt"
    scaler = torch.load(saved, weights_only=True)["scaler"]
    assert scaler["scale"] < 2.0**16  # it overflowed: not the initial scale
    assert execute_run(run, resumed, workload=workload, resume=True) == "completed"
    expected, got = final_model(whole.run_dir(run.run_id())), final_model(resumed.run_dir(run.run_id()))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert rows(whole.run_dir(run.run_id())) == rows(resumed.run_dir(run.run_id()))


def test_a_write_cut_short_by_a_killed_worker_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A worker torn down mid-write never reaches the atomic write's own cleanup (its
    temporary checkpoint stays behind); the attempt's end removes it, and only it."""
    from localsgd.run import training
    from localsgd.util.files import temporary_name

    def torn_down(config, folder, rank, world_size, workload=None):
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        temporary_name(folder / "checkpoints" / "step8-rank0.pt").write_bytes(b"half a checkpoint")
        (folder / "checkpoints" / ".kept").write_text("not a temporary file")
        raise RuntimeError("rank 1 failed: the group is torn down")

    monkeypatch.setattr(training, "train", torn_down)
    run = run_config(config({"name": "local_sgd", "period": 4}, workers=1, max_steps=4))
    store = Store(tmp_path / "store")
    assert execute_run(run, store) == "failed"
    left = sorted(p.name for p in store.run_dir(run.run_id()).rglob("*") if p.is_file())
    assert not [name for name in left if ".tmp" in name], left
    assert ".kept" in left
