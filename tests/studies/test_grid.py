"""Study grids: products, the fixed global batch, errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from localsgd.run.loading import ConfigError
from localsgd.studies.loading import load_study
from studies.grids import STUDY, write


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
        ("seed = [-1]", r"grid\[0\]: seed must be an integer in \[0, "),
        ("optimizer = {lr = ['x']}", r"grid\[0\]: optimizer\.lr must be a number, got str 'x'"),
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


def test_study_overrides_that_a_grid_shadows_are_rejected(tmp_path):
    path = write(tmp_path / "s.toml", STUDY)
    with pytest.raises(ConfigError, match=r"--set workers changes \[base\], but grid\[0\] sets 'workers'"):
        load_study(path, ["workers=8"])
    runs = load_study(path, ["workload.num_samples=2000"]).runs
    assert all(r.workload == {"name": "mnist1d_mlp", "num_samples": 2000} for r in runs)


def test_a_workload_name_axis_keeps_the_workload_options_of_base(tmp_path):
    path = write(
        tmp_path / "s.toml",
        """
[base.workload]
name = "mnist1d_cnn"
num_samples = 1000
[[grid]]
workload = ["mnist1d_cnn", "mnist1d_mlp"]
[[grid]]
workload = {num_samples = [2000, 3000]}
""",
    )
    specs = [r.workload for r in load_study(path).runs]
    assert specs == [
        {"name": "mnist1d_cnn", "num_samples": 1000},
        {"name": "mnist1d_mlp", "num_samples": 1000},
        {"name": "mnist1d_cnn", "num_samples": 2000},
        {"name": "mnist1d_cnn", "num_samples": 3000},
    ]
