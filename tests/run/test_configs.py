"""Run configs: TOML, overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from localsgd.run.config import run_config
from localsgd.run.loading import apply_overrides, load_run_config
from localsgd.util.checks import ConfigError


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
        ({"wrokers": 2}, r"unknown key 'wrokers'; allowed: \['algorithm', 'comm', 'data'"),
        ({"optimizer": {"lrr": 0.1}}, r"unknown key 'optimizer\.lrr'; allowed: \['beta1'"),
        ({"optimizer": {"lr": "fast"}}, r"optimizer\.lr must be a number, got str 'fast'"),
        ({"optimizer": {"lr": float("inf")}}, r"optimizer\.lr must be a finite number > 0, got inf"),
        ({"data": {"batch_size": 1.5}}, r"data\.batch_size must be an integer, got float 1\.5"),
        ({"data": {"batch_size": 10**12}}, r"data\.batch_size must be an integer in \[1, 16777216\]"),
        ({"data": {"num_samples": 1000}}, r"data\.num_samples was renamed: use workload\.num_samples"),
        ({"workers": True}, r"workers must be an integer, got bool True"),
        ({"workers": 10**6}, r"workers must be an integer in \[1, 65536\]"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, "),
        ({"optimizer": {"momentum": 1.5}}, r"optimizer\.momentum must be a finite number >= 0 and < 1"),
        ({"optimizer": {"name": "lamb"}}, r"optimizer\.name must be one of \['sgd', 'adamw'\]"),
        ({"schedule": {"name": "exponential"}}, r"schedule\.name must be one of"),
        ({"schedule": {"milestones": [0.8, 0.5]}}, r"schedule\.milestones must be increasing"),
        ({"schedule": {"milestones": 0.5}}, r"schedule\.milestones must be a list"),
        ({"engine": "threads"}, r"engine must be one of \['hogwild', 'processes', 'simulated'\]"),
        (
            {"algorithm": {"name": "local_sgd", "period": 0}},
            r"algorithm: local_sgd\.period must be an integer >= 1",
        ),
        (
            {"algorithm": {"name": "local_sgd", "switch_epoch": 1}},
            r"algorithm\.switch_epoch: local_sgd has no switch_step field to give in epochs",
        ),
        ({"algorithm": {"name": "nope"}}, r"algorithm name 'nope' is unknown"),
        ({"train": {"epochs": 0}}, r"train\.epochs must be a finite number > 0 and <= 1e\+06"),
        ({"train": {"epochs": float("inf")}}, r"train\.epochs must be a finite number"),
        (
            {"workload": {"name": "mnist1d_cnn", "num_samples": 10**12}},
            r"workload\.num_samples must be an integer in \[100, 10000000\]",
        ),
        (
            {"workload": {"name": "mnist1d_cnn", "bogus": 1}},
            r"unknown key 'workload\.bogus'; allowed: \['data_path'",
        ),
        (
            {"workload": {"num_samples": 100}},
            r"workload must be a name or import path, or a table with a 'name' key",
        ),
        ({"workload": "nosuchmodule:f"}, r"workload = 'nosuchmodule:f': cannot import 'nosuchmodule'"),
        ({"workload": "os:nope"}, r"workload = 'os:nope': module 'os' has no 'nope'"),
        ([1, 2], r"a run config must be a table of sections, got list"),
        ({"data": "big"}, r"data must be a table"),
    ],
)
def test_bad_configs_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        run_config(data)


def test_override_keeps_the_field_type_and_bad_files_are_named(tmp_path):
    path = write(tmp_path / "run.toml", "workers = 2\n")
    with pytest.raises(ConfigError, match=r"workers must be an integer, got str 'four'"):
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


@pytest.mark.parametrize("name", ["slowmo", "diloco"])
def test_outer_optimizers_take_the_switch_in_epochs_and_keep_their_run_ids_without(name):
    config = run_config({"algorithm": {"name": name, "switch_epoch": 2.5, "period": 4}})
    assert config.algorithm_config(steps_per_epoch=40).switch_step == 100
    with pytest.raises(ConfigError, match=rf"algorithm: {name}\.switch_step must be an integer >= 0, got -1"):
        run_config({"algorithm": {"name": name, "switch_step": -1}})
    # The algorithm table is kept as written: a config without a switch hashes as before.
    plain = run_config({"algorithm": {"name": name, "period": 4}})
    assert plain.to_dict()["algorithm"] == {"name": name, "period": 4}
    assert plain.algorithm_config(steps_per_epoch=40).switch_step == 0


def test_workload_and_block_size_are_checked_when_the_config_loads():
    with pytest.raises(
        ConfigError, match=r"workload = 'mnist1d' is not a registered workload \['cifar10_resnet20'"
    ):
        run_config({"workload": "mnist1d"})
    with pytest.raises(ConfigError, match=r"algorithm\.block_size = 4 does not divide workers = 6"):
        run_config({"workers": 6, "algorithm": {"name": "hierarchical_local_sgd", "block_size": 4}})


def test_workload_section_short_and_long_forms_are_one_config():
    short = run_config({"workload": "mnist1d_mlp"})
    long = run_config({"workload": {"name": "mnist1d_mlp"}})
    assert short == long and short.run_id() == long.run_id()
    assert short.workload_name == "mnist1d_mlp"
    with_options = load_run_config_text("workload = 'mnist1d_cnn'\n", ["workload.num_samples=2000"])
    assert with_options.workload == {"name": "mnist1d_cnn", "num_samples": 2000}


def load_run_config_text(text: str, overrides: list[str]):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load_run_config(write(Path(tmp) / "run.toml", text), overrides)


def test_a_run_records_config_snapshot_loads_back(tmp_path):
    from localsgd.records import Store

    config = run_config({"workers": 2, "algorithm": {"name": "local_sgd", "period": 4}})
    folder = Store(tmp_path).begin(config.run_id(), config.name, config.to_dict())
    assert load_run_config(folder / "config.json") == config


def test_bad_config_files_are_named(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"binary\.toml' is not UTF-8 text"):
        load_run_config(binary)
    with pytest.raises(ConfigError, match=r"is a folder"):
        load_run_config(tmp_path)
    listing = write(tmp_path / "list.json", "[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json' must hold a JSON object, got list"):
        load_run_config(listing)
