"""Metaparameter search: quasi-random trials as ordinary runs, resumable, errors naming the key."""

from __future__ import annotations

import math

import pytest
from scipy.stats import qmc

from localsgd.run.loading import ConfigError
from localsgd.studies.loading import load_study
from localsgd.studies.runner import run_study
from localsgd.studies.search import parse
from studies.grids import write
from studies.test_runner import fake_execute

SEARCH = """
[study]
name = "search-test"

[base]
workload = "mnist1d_mlp"
[base.optimizer]
nesterov = false

[[grid]]
data.batch_size = [16, 64]
[grid.search]
trials = {trials}
seed = 3
method = "{method}"
lr = {{ log = [1e-3, 10] }}
momentum = {{ one_minus_log = [1e-3, 0.5] }}
schedule.warmup_epochs = {{ uniform = [0, 5] }}

[[grid]]                  # not a search: one run
data.batch_size = 16
"""


def study_text(trials: int = 5, method: str = "sobol") -> str:
    return SEARCH.format(trials=trials, method=method)


@pytest.mark.parametrize("method", ["sobol", "halton"])
def test_each_trial_is_a_run_at_a_scrambled_quasi_random_point(tmp_path, method):
    study = load_study(write(tmp_path / "s.toml", study_text(5, method)))
    assert len(study.runs) == 2 * 5 + 1
    trials = [r for r in study.runs if r.run_id() in study.trials]
    assert len(trials) == 10 and study.runs[-1].run_id() not in study.trials
    assert [study.trials[r.run_id()]["trial"] for r in trials] == [0, 1, 2, 3, 4] * 2
    assert study.trials[trials[0].run_id()] == {
        "block": "grid[0]",
        "trial": 0,
        "keys": ["optimizer.lr", "optimizer.momentum", "schedule.warmup_epochs"],
    }
    # The same points at every grid point (batch size), from scipy's scrambled sequence.
    sampler = (
        qmc.Sobol(3, scramble=True, seed=3) if method == "sobol" else qmc.Halton(3, scramble=True, seed=3)
    )
    unit = sampler.random_base2(3)[:5] if method == "sobol" else sampler.random(5)
    for batch, runs in ((16, trials[:5]), (64, trials[5:])):
        for run, u in zip(runs, unit):
            assert run.data.batch_size == batch
            assert math.log(run.optimizer.lr) == pytest.approx(math.log(1e-3) + u[0] * math.log(1e4))
            assert math.log(1 - run.optimizer.momentum) == pytest.approx(
                math.log(1e-3) + u[1] * math.log(500), rel=1e-9
            )
            assert run.schedule.warmup_epochs == pytest.approx(5 * u[2])
    assert all(0.5 <= r.optimizer.momentum <= 0.999 and 1e-3 <= r.optimizer.lr <= 10 for r in trials)


def test_more_trials_keep_the_runs_already_done_and_a_search_resumes(tmp_path):
    few = load_study(write(tmp_path / "few.toml", study_text(5)))
    more = load_study(write(tmp_path / "more.toml", study_text(12)))
    assert {r.run_id() for r in few.runs} < {r.run_id() for r in more.runs}
    out = tmp_path / "store"
    assert run_study(few, out, execute=fake_execute(), progress=False) == {"completed": 11}
    executed: list[str] = []
    counts = run_study(more, out, execute=fake_execute(executed=executed), progress=False)
    assert counts == {"skipped (completed)": 11, "completed": 14}
    plan = __import__("json").loads((out / "plan.json").read_text())
    searched = [r for r in plan["runs"] if "search" in r]
    assert len(searched) == 24 and {r["search"]["trial"] for r in searched} == set(range(12))


@pytest.mark.parametrize(
    "search,message",
    [
        ("seed = 1", r"grid\[0\]\.search\.trials is missing"),
        ("trials = 0\nlr = { log = [0.1, 1] }", r"grid\[0\]\.search\.trials must be"),
        ("trials = 4", r"grid\[0\]\.search searches nothing"),
        ("trials = 4\nmethod = 'grid'\nlr = { log = [0.1, 1] }", r"grid\[0\]\.search\.method must be one of"),
        (
            "trials = 4\nlr = { log = [0, 1] }",
            r"grid\[0\]\.search\.lr\.log = \[0, 1\]: a log space needs 0 < low",
        ),
        (
            "trials = 4\nlr = { log = [1, 0.1] }",
            r"grid\[0\]\.search\.lr\.log = \[1, 0\.1\]: low must be below",
        ),
        ("trials = 4\nlr = { log = [0.1] }", r"grid\[0\]\.search\.lr\.log must be \[low, high\]"),
        ("trials = 4\nlr = { cube = [0.1, 1] }", r"grid\[0\]\.search\.lr must be one space"),
        ("trials = 4\nlr = 0.1", r"grid\[0\]\.search\.lr must be one space"),
        (
            "trials = 4\nmomentum = { one_minus_log = [0.1, 2] }",
            r"grid\[0\]\.search\.momentum\.one_minus_log = \[0\.1, 2\] bounds 1 − value: high must be at most 1",
        ),
        (
            "trials = 4\nlr = { log = [0.1, 1] }\noptimizer.lr = { log = [0.1, 1] }",
            r"grid\[0\]\.search gives 'optimizer\.lr' twice",
        ),
        (
            "trials = 4\noptimizer.lrr = { log = [0.1, 1] }",
            r"grid\[0\]\.search \(trial 0\): unknown key 'optimizer\.lrr'",
        ),
        (
            "trials = 4\nmomentum = { uniform = [0.5, 2] }",
            r"grid\[0\]\.search \(trial .\): optimizer\.momentum must be",
        ),
    ],
)
def test_bad_search_tables_name_the_key(tmp_path, search, message):
    text = f'[base]\nworkload = "mnist1d_mlp"\n[[grid]]\nseed = [0]\n[grid.search]\n{search}\n'
    with pytest.raises(ConfigError, match=message):
        load_study(write(tmp_path / "s.toml", text))


def test_a_searched_key_set_by_its_block_too_is_refused(tmp_path):
    text = '[base]\nworkload = "mnist1d_mlp"\n[[grid]]\noptimizer.lr = [0.1, 0.2]\n[grid.search]\ntrials = 2\nlr = { log = [0.1, 1] }\n'
    with pytest.raises(
        ConfigError,
        match=r"grid\[0\]\.search\.optimizer\.lr is searched, but grid\[0\] also sets 'optimizer\.lr'",
    ):
        load_study(write(tmp_path / "s.toml", text))


def test_spaces_map_the_unit_interval_onto_their_bounds():
    search = parse(
        {
            "trials": 1,
            "lr": {"log": [0.01, 1]},
            "momentum": {"one_minus_log": [0.01, 1]},
            "x.y": {"uniform": [2, 4]},
        },
        "grid[0]",
    )
    lr, momentum, uniform = search.dimensions
    assert (lr.path, momentum.path, uniform.path) == ("optimizer.lr", "optimizer.momentum", "x.y")
    assert [lr.value(u) for u in (0, 0.5, 1)] == pytest.approx([0.01, 0.1, 1])
    assert [momentum.value(u) for u in (0, 0.5, 1)] == pytest.approx([0.99, 0.9, 0.0])
    assert [uniform.value(u) for u in (0, 0.25, 1)] == pytest.approx([2, 2.5, 4])


def test_the_batch_size_study_searches_every_batch_size():
    from collections import Counter
    from pathlib import Path

    studies = Path(__file__).resolve().parents[2] / "studies"
    study = load_study(studies / "batch_size.toml")
    assert len(study.runs) == len(study.trials) == 2 * 2 * 9 * 16
    cells = Counter((r.workload_name, r.data.batch_size, r.optimizer.momentum == 0) for r in study.runs)
    assert set(cells.values()) == {16} and {b for _, b, _ in cells} == {2**i for i in range(4, 13)}
    assert study.section.target == {"mnist1d_fc": "accuracy=0.5", "mnist1d_cnn": "accuracy=0.85"}
    assert {r.train.stop_at for r in study.runs if r.workload_name == "mnist1d_fc"} == {"accuracy=0.5"}
    small = load_study(studies / "batch_size_small.toml")
    assert len(small.runs) == 8 * 2 * (5 + 4 + 1) * 3  # 3 seeds of every trial
