"""Configs, overrides, grids, recipes, the store and the resumable runner (no training)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from localsgd.studies import recipes
from localsgd.studies.configs import ConfigError, apply_overrides
from localsgd.studies.grid import load_study
from localsgd.studies.loading import load_run_config
from localsgd.studies.runner import run_study
from localsgd.studies.schema import RunConfig, ScheduleConfig, run_config
from localsgd.studies.store import Store, write_json_atomic

# -- run configs ---------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_run_config_from_toml_with_overrides(tmp_path):
    path = write(
        tmp_path / "run.toml",
        """
workers = 2
[algorithm]
name = "local_sgd"
period = 8
[optimizer]
lr = 0.05
""",
    )
    config = load_run_config(path, ["algorithm.period=16", "data.batch_size=32", "schedule.name='cosine'"])
    assert config.workers == 2
    assert config.algorithm_config(10).period == 16
    assert config.data.batch_size == 32 and config.schedule.name == "cosine"
    assert config.optimizer.lr == 0.05 and config.global_batch == 64
    assert run_config(config.to_dict()) == config
    assert config.run_id() == run_config(config.to_dict()).run_id()
    assert config.run_id() != config.replace(seed=1).run_id()


@pytest.mark.parametrize(
    "data,message",
    [
        ({"wrokers": 2}, r"unknown key 'wrokers'; allowed: \['algorithm', 'data'"),
        ({"optimizer": {"lrr": 0.1}}, r"unknown key 'optimizer\.lrr'; allowed: \['beta1'"),
        ({"optimizer": {"lr": "fast"}}, r"optimizer\.lr must be float, got str 'fast'"),
        ({"data": {"batch_size": 1.5}}, r"data\.batch_size must be int, got float 1\.5"),
        ({"workers": True}, r"workers must be int, got bool True"),
        ({"optimizer": {"momentum": 1.5}}, r"optimizer\.momentum must be a number in \[0\.0, 1\.0\)"),
        ({"optimizer": {"name": "lamb"}}, r"optimizer\.name must be one of \['sgd', 'adamw'\]"),
        ({"schedule": {"name": "linear"}}, r"schedule\.name must be one of"),
        ({"schedule": {"milestones": [0.8, 0.5]}}, r"schedule\.milestones must be increasing"),
        ({"schedule": {"milestones": 0.5}}, r"schedule\.milestones must be a list"),
        ({"engine": "threads"}, r"engine must be one of \['processes', 'simulated'\]"),
        (
            {"algorithm": {"name": "local_sgd", "period": 0}},
            r"algorithm: local_sgd\.period must be an integer >= 1",
        ),
        (
            {"algorithm": {"name": "local_sgd", "switch_epoch": 1}},
            r"switch_epoch applies to post_local_sgd only",
        ),
        ({"algorithm": {"name": "nope"}}, r"algorithm name 'nope' is unknown"),
        ({"train": {"epochs": 0}}, r"train\.epochs must be a number in \(0\.0, inf\)"),
        ({"data": "big"}, r"data must be a table"),
    ],
)
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        run_config(data)


def test_override_keeps_the_field_type_and_bad_files_are_named(tmp_path):
    path = write(tmp_path / "run.toml", "workers = 2\n")
    with pytest.raises(ConfigError, match=r"workers must be int, got str 'four'"):
        load_run_config(path, ["workers=four"])
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_run_config(path, ["workers"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_run_config(write(tmp_path / "bad.toml", "workers = = 2"))
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_post_local_switch_in_epochs_becomes_steps():
    config = run_config({"algorithm": {"name": "post_local_sgd", "switch_epoch": 2.5, "period": 4}})
    assert config.algorithm_config(steps_per_epoch=40).switch_step == 100
    with pytest.raises(ConfigError, match="not both"):
        run_config({"algorithm": {"name": "post_local_sgd", "switch_epoch": 1, "switch_step": 3}})


# -- study grids ---------------------------------------------------------------------------------

STUDY = """
[study]
name = "grid-test"

[base]
workload = "mnist1d_mlp"
[base.data]
batch_size = 32
[base.algorithm]
name = "local_sgd"
period = 8

[[grid]]
workers = [1]
seed = [0, 1]
algorithm = [{name = "minibatch_sgd"}]

[[grid]]
workers = [2, 4]
seed = [0, 1]
global_batch = 128
[grid.algorithm]
period = [4, 16]

[[grid]]
workers = [2]
[grid.schedule]
name = "step"
milestones = [[0.5], [0.3, 0.6]]
"""


def test_grid_expands_to_the_product_and_holds_the_global_batch(tmp_path):
    study = load_study(write(tmp_path / "s.toml", STUDY))
    runs = study.runs
    assert len(runs) == 2 + 2 * 2 * 2 + 2
    assert len({r.run_id() for r in runs}) == len(runs)
    baseline = runs[:2]
    assert all(r.workers == 1 and r.algorithm == {"name": "minibatch_sgd"} for r in baseline)
    assert all(r.data.batch_size == 32 and r.fixed == "worker_batch" for r in baseline)
    held = runs[2:10]
    assert sorted({(r.workers, r.data.batch_size) for r in held}) == [(2, 64), (4, 32)]
    assert all(r.global_batch == 128 and r.fixed == "global_batch" for r in held)
    assert Counter(r.algorithm["period"] for r in held) == {4: 4, 16: 4}
    assert all(r.algorithm["name"] == "local_sgd" for r in held)
    assert [r.schedule.milestones for r in runs[10:]] == [(0.5,), (0.3, 0.6)]
    assert all(r.name == "grid-test" for r in runs)
    assert study.default_out() == Path("studies_out/grid-test")


@pytest.mark.parametrize(
    "grid,message",
    [
        (
            "workers = [3]\nglobal_batch = 128",
            r"grid\[0\]\.global_batch = 128 is not divisible by workers = 3",
        ),
        ("workers = []", r"grid\[0\]\.workers is an empty list"),
        ("seed = [-1]", r"grid\[0\]: seed must be an integer >= 0"),
        ("optimizer = {lr = ['x']}", r"grid\[0\]: optimizer\.lr must be float, got str 'x'"),
        ("algorithm = ['local_sgd']", r"algorithm values must be tables"),
        ("wrkers = [2]", r"grid\[0\]: unknown key 'wrkers'"),
    ],
)
def test_bad_grids_name_the_key(tmp_path, grid, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write(tmp_path / "s.toml", f"[[grid]]\n{grid}\n"))


def test_unknown_study_sections_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['bsae'\]"):
        load_study(write(tmp_path / "s.toml", "[bsae]\nworkers = 2\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'study\.nmae'"):
        load_study(write(tmp_path / "s.toml", "[study]\nnmae = 'x'\n"))


# -- recipes -------------------------------------------------------------------------------------


def test_learning_rate_schedules():
    lr = 0.1

    def at(step: int, **kw) -> float:
        return recipes.lr_at(step, 100, 10, lr, ScheduleConfig(**kw), global_batch=512)

    assert at(0) == at(99) == lr
    assert [at(s, name="step", milestones=(0.5, 0.75)) for s in (49, 50, 74, 75)] == pytest.approx(
        [0.1, 0.01, 0.01, 0.001]
    )
    assert at(0, name="cosine") == pytest.approx(lr)
    assert at(50, name="cosine") == pytest.approx(lr / 2)
    assert at(100, name="cosine") == pytest.approx(0.0, abs=1e-12)
    assert at(49, name="half_cosine") == lr
    assert at(75, name="half_cosine") == pytest.approx(lr / 2)
    # Linear scaling: 512 / 128 = 4x; warmup over 2 epochs (20 steps) from the base rate.
    scaled = {"linear_scaling": True, "base_batch": 128, "warmup_epochs": 2.0}
    assert at(0, **scaled) == pytest.approx(0.1)
    assert at(10, **scaled) == pytest.approx(0.25)
    assert at(20, **scaled) == pytest.approx(0.4)
    assert at(99, **scaled) == pytest.approx(0.4)


def test_optimizer_recipes():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    config = run_config({"optimizer": {"decay_norm_and_bias": False, "weight_decay": 0.01}}).optimizer
    opt = recipes.build_optimizer(model, config)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.01 and all(p.ndim == 2 for p in decayed["params"])
    assert exempt["weight_decay"] == 0.0 and len(exempt["params"]) == 4  # 2 biases, BN weight and bias
    adamw = recipes.build_optimizer(model, run_config({"optimizer": {"name": "adamw", "lr": 1e-3}}).optimizer)
    assert isinstance(adamw, torch.optim.AdamW) and len(adamw.param_groups) == 1


# -- store and runner ----------------------------------------------------------------------------


def fake_execute(kill_at: set[str] | None = None, executed: list[str] | None = None):
    """Stands in for the process engine: writes a two-row record, or dies mid-run."""

    def execute(config: RunConfig, store: Store) -> str:
        run_id = config.run_id()
        folder = store.begin(run_id, config.name, config.to_dict())
        if executed is not None:
            executed.append(run_id)
        with (folder / "metrics.jsonl").open("w") as f:
            for step in (1, 2):
                f.write(json.dumps({"step": step, "test_accuracy": 0.5}) + "\n")
                if kill_at and run_id in kill_at:
                    raise KeyboardInterrupt  # killed half-way: one row written, no status
        write_json_atomic(folder / "status.json", {"status": "completed", "error": None})
        return store.finish(run_id)

    return execute


def test_study_killed_mid_run_resumes_without_duplicates_or_losses(tmp_path):
    study = load_study(write(tmp_path / "s.toml", STUDY))
    out = tmp_path / "store"
    victim = study.runs[4].run_id()
    with pytest.raises(KeyboardInterrupt):
        run_study(study, out, execute=fake_execute({victim}), progress=False)
    store = Store(out)
    assert len(store.records()) == 4
    assert (out / "runs" / f"{victim}.partial").exists()
    assert store.status(victim) == "running"

    executed: list[str] = []
    counts = run_study(study, out, execute=fake_execute(executed=executed), progress=False)
    assert counts == {"skipped (completed)": 4, "completed": len(study.runs) - 4}
    assert executed[0] == victim and len(executed) == len(study.runs) - 4
    records = store.records()
    assert sorted(r.run_id for r in records) == sorted(r.run_id() for r in study.runs)
    assert all(len(r.metrics()) == 2 for r in records)  # the killed attempt's row is gone
    assert not list((out / "runs").glob("*.partial"))

    again = run_study(study, out, execute=fake_execute(), progress=False)
    assert again == {"skipped (completed)": len(study.runs)}


def test_store_records_a_run_that_died_without_a_status(tmp_path):
    store = Store(tmp_path)
    store.begin("abc", "x", {"workers": 2})
    assert store.finish("abc", error="workers exited with code 1") == "failed"
    (record,) = store.records()
    assert record.status == "failed" and "code 1" in (record.error or "")
    with pytest.raises(ValueError, match="is not a localsgd store"):
        Store(tmp_path / "elsewhere", create=False)


def test_a_run_renamed_but_not_indexed_is_reconciled(tmp_path):
    store = Store(tmp_path)
    folder = store.begin("abc", "x", {})
    write_json_atomic(folder / "status.json", {"status": "diverged", "error": "loss nan"})
    folder.rename(store.run_dir("abc"))  # killed between the rename and the index update
    assert store.status("abc") == "diverged"
    assert [r.status for r in store.records()] == ["diverged"]


def test_study_overrides_that_a_grid_shadows_are_rejected(tmp_path):
    path = write(tmp_path / "s.toml", STUDY)
    with pytest.raises(ConfigError, match=r"--set workers changes \[base\], but grid\[0\] sets 'workers'"):
        load_study(path, ["workers=8"])
    assert all(r.data.num_samples == 2000 for r in load_study(path, ["data.num_samples=2000"]).runs)


def test_workload_and_block_size_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"workload must be one of \['cifar10_resnet20', 'mnist1d_cnn'"):
        run_config({"workload": "mnist1d"})
    with pytest.raises(ConfigError, match=r"algorithm\.block_size = 4 does not divide workers = 6"):
        run_config({"workers": 6, "algorithm": {"name": "hierarchical_local_sgd", "block_size": 4}})


def test_rerunning_from_the_stores_own_study_copy(tmp_path):
    study_file = write(tmp_path / "s.toml", STUDY)
    out = tmp_path / "store"
    run_study(load_study(study_file), out, study_file=study_file, execute=fake_execute(), progress=False)
    copy = out / "study.toml"
    counts = run_study(load_study(copy), out, study_file=copy, execute=fake_execute(), progress=False)
    assert counts == {"skipped (completed)": 12}
