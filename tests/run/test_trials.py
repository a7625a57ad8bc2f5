"""Trials batched in the simulated engine: exact against the runs one by one, grouped by
what they share, recorded as runs of their own."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from localsgd.engines.simulated.trials import ReplicaSGD
from localsgd.records.store import Store
from localsgd.run.config import run_config
from localsgd.run.training import train
from localsgd.run.trials import batch_key, batches, train_trials
from localsgd.studies.grid import Study, StudySection
from localsgd.studies.runner import run_study
from localsgd.util.checks import ConfigError

pytestmark = pytest.mark.timeout(600)


def trial(name: str, **changes: Any) -> Any:
    spec: dict[str, Any] = {
        "name": name,
        "workload": {"name": "mnist1d_cnn", "num_samples": 1000},
        "workers": 2,
        "engine": "simulated",
        "seed": 1,
        "algorithm": {"name": "local_sgd", "period": 2},
        "data": {"batch_size": 16},
        "optimizer": {"lr": 0.05, "momentum": 0.9, "nesterov": False, "decay_norm_and_bias": False},
        "train": {"epochs": 10, "max_steps": 8, "eval_every": 3},
    }
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition("__")
        (spec.setdefault(section, {}) if section else spec)[key] = value
    return run_config(spec)


TRIALS = [
    trial("a", optimizer__weight_decay=5e-4, schedule={"name": "cosine"}),
    trial(
        "b",
        optimizer__lr=0.2,
        optimizer__momentum=0.0,
        seed=2,
        schedule={"name": "step", "warmup_epochs": 0.1},
    ),
    trial(
        "c",
        optimizer__lr=0.01,
        optimizer__momentum=0.5,
        optimizer__nesterov=False,
        optimizer__weight_decay=1e-3,
    ),
]


def test_trials_batched_equal_the_runs_one_by_one(tmp_path, monkeypatch, data_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    folders = [tmp_path / f"batched-{c.name}" for c in TRIALS]
    for folder in folders:
        folder.mkdir()
    statuses = train_trials(TRIALS, folders)
    for config, folder, batched in zip(TRIALS, folders, statuses):
        alone_dir = tmp_path / f"alone-{config.name}"
        alone_dir.mkdir()
        alone = train(config, alone_dir, 0, 1)
        assert batched.status == alone.status == "completed"
        assert batched.details["trials_batched"] == 3 and batched.details["path"] == "fused"
        ours_file, theirs_file = torch.load(folder / "checkpoint.pt"), torch.load(alone_dir / "checkpoint.pt")
        # The group-committed final model is the file a run of its own saves.
        assert ours_file.keys() == theirs_file.keys() == {"model", "config", "step"}
        assert ours_file["config"] == theirs_file["config"] == config.to_dict() and ours_file["step"] == 8
        ours, theirs = ours_file["model"], theirs_file["model"]
        for key, tensor in theirs.items():
            if tensor.is_floating_point():
                err = float((ours[key] - tensor).norm() / tensor.norm().clamp_min(1e-12))
                assert err <= 1e-5, f"{config.name} {key}: relative error {err:.2e}"
            else:
                assert torch.equal(ours[key], tensor)
        rows_ours = (folder / "metrics.jsonl").read_text().splitlines()
        rows_theirs = (alone_dir / "metrics.jsonl").read_text().splitlines()
        assert len(rows_ours) == len(rows_theirs) == 3  # steps 3, 6, 8
        assert batched.final is not None and alone.final is not None
        assert batched.final.lr == pytest.approx(alone.final.lr, rel=1e-12)
        assert batched.final.train_loss == pytest.approx(alone.final.train_loss, rel=1e-5)
        assert batched.final.metrics["eval_loss"] == pytest.approx(alone.final.metrics["eval_loss"], rel=1e-5)
        for field in ("steps", "syncs", "collectives", "bytes"):
            assert getattr(batched.counters, field) == getattr(alone.counters, field), field


def test_what_batches_with_what():
    base = trial("a")
    assert batch_key(base) == batch_key(TRIALS[1]) == batch_key(TRIALS[2])
    data = TRIALS[1].to_dict()
    assert batch_key(TRIALS[1], data) == batch_key(base) and data == TRIALS[1].to_dict()  # left as it was
    assert batch_key(trial("k", workers=4)) != batch_key(base)
    assert batch_key(trial("h", algorithm={"name": "local_sgd", "period": 4})) != batch_key(base)
    assert batch_key(trial("p", engine="processes")) is None
    assert batch_key(trial("w", optimizer={"name": "adamw", "lr": 1e-3})) is None
    # SlowMo scales its outer step by the inner rate: its trials must share the rate.
    slowmo = {"name": "slowmo", "period": 2}
    assert batch_key(trial("s", algorithm=slowmo)) == batch_key(trial("t", algorithm=slowmo, seed=5))
    assert batch_key(trial("s", algorithm=slowmo)) != batch_key(
        trial("t", algorithm=slowmo, optimizer__lr=0.3)
    )
    runs = [trial(f"r{i}", optimizer__lr=0.01 * (i + 1)) for i in range(5)] + [trial("k", workers=4)]
    assert [[r.name for r in b] for b in batches(runs, 2)] == [["r0", "r1"], ["r2", "r3"], ["r4"], ["k"]]
    assert [len(b) for b in batches(runs, 1)] == [1] * 6


def test_replica_sgd_steps_each_row_as_torch_sgd():
    torch.manual_seed(0)
    settings = [(0.1, 0.9, 0.0), (0.5, 0.0, 1e-2), (0.01, 0.5, 1e-3)]
    for nesterov in (False, True):
        rows = [torch.randn(4, 3, requires_grad=True) for _ in settings]
        stacked = torch.stack([r.detach() for r in rows]).requires_grad_()
        opts = [
            torch.optim.SGD([r], lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov and mu > 0)
            for r, (lr, mu, wd) in zip(rows, settings)
        ]
        # Nesterov with μ = 0 is plain SGD, as torch's own SGD (which refuses the combination).
        ours = ReplicaSGD(
            [{"params": [stacked], "weight_decay": torch.tensor([s[2] for s in settings])}],
            momentum=torch.tensor([s[1] for s in settings]),
            nesterov=nesterov,
        )
        for _ in range(4):
            grads = torch.randn(3, 4, 3)
            for r, g, opt in zip(rows, grads, opts):
                r.grad = g.clone()
                opt.step()
            stacked.grad = grads.clone()
            ours.set_lr(torch.tensor([s[0] for s in settings]))
            ours.step()
        for i, r in enumerate(rows):
            torch.testing.assert_close(stacked[i].detach(), r.detach(), rtol=1e-6, atol=1e-7)


def study(runs: list[Any]) -> Study:
    return Study(section=StudySection(name="search"), runs=list(runs))


def test_study_batches_trials_records_each_and_resumes(tmp_path, monkeypatch, data_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    runs = [*TRIALS, trial("diverges", optimizer__lr=1e8, optimizer__momentum=0.0, optimizer__weight_decay=1.0)]
    counts = run_study(study(runs), tmp_path / "batched", progress=False)
    assert counts == {"completed": 3, "diverged": 1}
    store = Store(tmp_path / "batched", create=False)
    alone = run_study(study(TRIALS), tmp_path / "alone", progress=False, batch_trials=1)
    assert alone == {"completed": 3}
    other = Store(tmp_path / "alone", create=False)
    for run in TRIALS:
        ours, theirs = store.final_status(run.run_id()), other.final_status(run.run_id())
        assert ours is not None and theirs is not None
        assert ours.details["trials_batched"] == 4 and "trials_batched" not in theirs.details
        assert ours.wall_seconds == pytest.approx(ours.details["batch_wall_seconds"] / 4)  # its share
        assert ours.final is not None and theirs.final is not None
        assert ours.final.metrics["eval_loss"] == pytest.approx(theirs.final.metrics["eval_loss"], rel=1e-5)
    bad = store.final_status(runs[-1].run_id())
    assert bad is not None and bad.status == "diverged" and bad.error is not None
    assert "train loss is nan" in bad.error.message.lower()
    again = run_study(study(runs), tmp_path / "batched", progress=False)
    assert again == {"skipped (completed)": 3, "skipped (diverged)": 1}
    with pytest.raises(ConfigError, match="--batch-trials must be an integer >= 1, got 0"):
        run_study(study(runs), tmp_path / "batched", progress=False, batch_trials=0)


class _Drawn(torch.nn.Module):
    """A model that draws random numbers outside its layers' ``reset_parameters``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(40, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
        self.register_buffer("mask", torch.rand(40))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.mask)


@pytest.mark.parametrize("name", ["mnist1d_mlp", "mnist1d_cnn", "drawn"])
def test_stacked_initialisation_equals_the_models_built_one_by_one(name, monkeypatch, data_cache):
    from localsgd import workloads
    from localsgd.engines.simulated.trials import SeededModels, TrialReplicas

    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    workload = workloads.build("mnist1d_mlp" if name == "drawn" else name, num_samples=200)
    if name == "drawn":
        monkeypatch.setattr(workload, "_model_factory", _Drawn)
    seeds = [5, 0, 17, 5, 3]
    models = SeededModels(workload.make_model, seeds, torch.device("cpu"))
    replicas = TrialReplicas(workload, models, 2, seeds, torch.device("cpu"))
    # Replaying each layer's initialisation is exact for models built of common layers; a
    # model that draws otherwise is built one by one, with the same result.
    assert models.stacked_init is (name != "drawn")
    stacked = dict(zip(replicas.module.param_names, replicas.module.stacked))
    buffers = dict(zip(replicas.module.buffer_names, replicas.module.stacked_buffers()))
    for r, seed in enumerate(seeds):
        torch.manual_seed(seed)  # as BatchedTrials built each trial's model before
        alone = workload.make_model(seed)
        for key, tensor in [*alone.named_parameters(), *alone.named_buffers()]:
            for k in range(2):
                ours = (stacked[key] if key in stacked else buffers[key])[r * 2 + k]
                assert torch.equal(ours, tensor.detach()), f"trial {r} replica {k}: {key}"
    first = stacked[replicas.module.param_names[0]].detach()
    assert len({float(first[2 * r].sum()) for r in range(len(seeds))}) == 4  # 4 seeds, 4 models


def test_stacked_evaluation_equals_each_trial_alone(monkeypatch, data_cache):
    from localsgd import workloads
    from localsgd.engines.simulated.trials import SeededModels, TrialReplicas

    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    workload = workloads.build("mnist1d_cnn", num_samples=500)
    seeds = [1, 2, 3, 4]
    replicas = TrialReplicas(
        workload, SeededModels(workload.make_model, seeds, torch.device("cpu")), 1, seeds, torch.device("cpu")
    )
    for batch, _ in zip(replicas.batches(16, 0), range(3)):  # BatchNorm's running statistics move
        replicas.forward_backward(batch)
        with torch.no_grad():
            for p in replicas.module.stacked:
                p.sub_(0.1 * p.grad)
    from localsgd.engines.simulated import trials as simulated_trials

    x_test = workload._splits["cpu"][4]

    cases = [("test", 4, [0, 2, 3]), ("validation", 4, [0, 2, 3]), ("test", 3, [0, 2, 3])]
    cases += [("test", 1, [0, 2, 3]), ("test", 4, [1, 2])]
    for split, chunk, trials in cases:
        # Inputs of at most `chunk` trials at once, over the span of the trials asked for:
        # trials 0-3 in one, in 3 + 1, in 1 x 4; trials 1-2 in one.
        monkeypatch.setattr(simulated_trials, "STACKED_EVALUATION_ELEMENTS", chunk * x_test.numel())
        stacked = replicas.evaluate_trials(trials, split)
        assert replicas.stacked_evaluation is True
        assert list(stacked) == trials
        for t, scores in stacked.items():
            assert scores == pytest.approx(replicas.evaluate(t, split), rel=1e-5)
        assert len({s["eval_loss"] for s in stacked.values()}) == len(trials)  # each trial its own
    assert replicas.details()["stacked_evaluation"] is True
    assert sorted(replicas._evaluators) == [(0, 1), (0, 3), (0, 4), (1, 2), (1, 3), (2, 3), (3, 4)]

    # Inputs sliced afresh (equal values, other tensors) are still served from the stack.

    def copied(model: Any, device: Any, split: str = "test") -> dict[str, float]:
        model.eval()
        return {"accuracy": float(model(x_test.clone()).detach().sum()), "eval_loss": 0.0}

    monkeypatch.setattr(workload, "evaluate", copied)
    ours = replicas.evaluate_trials([0, 1, 2])
    for t in (0, 1, 2):
        assert ours[t] == pytest.approx(replicas.evaluate(t), rel=1e-5)
    assert replicas.stacked_evaluation is True

    # An evaluation that calls its model otherwise than on one tensor (by keyword) cannot be stacked:
    # every trial is evaluated alone from then on, with the same results.
    def keyword(model: Any, device: Any, split: str = "test") -> dict[str, float]:
        model.eval()
        return {"accuracy": float(model(x=x_test).detach().sum()), "eval_loss": 0.0}

    monkeypatch.setattr(workload, "evaluate", keyword)
    ours = replicas.evaluate_trials([0, 1, 2])
    for t in (0, 1, 2):
        assert ours[t] == pytest.approx(replicas.evaluate(t), rel=1e-5)
    assert replicas.stacked_evaluation is False
    assert "other than one tensor" in replicas.details()["stacked_evaluation_reason"]
