"""Studies in stages: a later stage's runs are made from the models an earlier stage's runs
exported, once those have finished; the file is checked as a whole before anything runs;
a failed earlier run's later runs are skipped and reported; a rerun skips every finished
run and makes the later stage's runs again with the same ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from localsgd.records.record import ErrorInfo
from localsgd.records.store import Store
from localsgd.run.execute import execute_run
from localsgd.studies import stages
from localsgd.studies.loading import load_study
from localsgd.studies.runner import run_study
from localsgd.util.checks import ConfigError

pytest.importorskip("transformers")


def study_text(fx: dict[str, Path], *, pretrain_grid: str | None = None, finetune: str = "") -> str:
    """Stage 1: masked LM from the fixture BERT, K = 1 and 2 (and a third run, which the
    test makes fail); stage 2: classification from each exported model and from the
    fixture BERT itself, seeds 0 and 1. A few steps each."""
    corpus = fx["corpus"]
    pretrain_grid = (
        pretrain_grid
        or 'workers = [1, 2]\nalgorithm = [{ name = "minibatch_sgd" }, { name = "local_sgd", period = 2 }]'
    )
    return f"""
[study]
name = "stilt_test"

[[stage]]
name = "pretrain"
[stage.base]
threads = 1
workload = {{ name = "mlm", model = {{ path = "{fx["model"]}" }}, data = {{ path = "{corpus / "train.txt"}", eval_path = "{corpus / "valid.txt"}", max_length = 32, cache = "{fx["cache"]}" }} }}
data = {{ batch_size = 8 }}
optimizer = {{ name = "adamw", lr = 3e-3 }}
train = {{ epochs = 1, eval_every = 3, max_steps = 3 }}
[[stage.grid]]
{pretrain_grid}

[[stage]]
name = "finetune"
[stage.base]
workload = {{ name = "classification", model = {{ path = {{ from_stage = "pretrain" }} }}, data = {{ path = "{fx["classification"]}", max_length = 32, cache = "{fx["cache"]}" }} }}
data = {{ batch_size = 16 }}
optimizer = {{ name = "adamw", lr = 3e-3 }}
train = {{ epochs = 1, eval_every = 2, max_steps = 2 }}
threads = 1
{finetune}
[[stage.grid]]
workload.model.path = [{{ from_stage = "pretrain" }}, "{fx["model"]}"]
seed = [0, 1]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_later_stage_is_planned_from_templates(tmp_path, text_fixtures):
    study = load_study(write(tmp_path / "s.toml", study_text(text_fixtures)))
    first, second = study.stages
    assert (first.name, first.source, len(first.runs), first.templates) == ("pretrain", None, 4, [])
    assert study.runs == first.runs  # what runs first
    assert (second.source, len(second.templates), len(second.runs)) == ("pretrain", 2, 2)
    assert {r.seed for r in second.templates} == {0, 1}
    assert all(r.workload["model"]["path"] == str(text_fixtures["model"]) for r in second.runs)
    assert not Path(second.standin).exists()  # the stand-in lived while the file was read
    lines = stages.plan_lines(study)
    assert lines[0] == "stage pretrain: 4 run(s)"
    assert lines[5].startswith(
        "stage finetune: 2 run(s) for each completed run of stage pretrain (up to 8) and 2 more"
    )
    assert sum("per run" in line and "<model of a run of pretrain>" in line for line in lines) == 2
    assert stages.total_runs(study) == 4 + 8 + 2
    with pytest.raises(ConfigError, match=r"a study in stages runs stage by stage"):
        run_study(study, tmp_path / "store")  # its first stage alone would look like all of it


def test_dry_run_shows_every_stage(tmp_path, text_fixtures):
    from typer.testing import CliRunner

    from localsgd.cli import app

    study_file = write(tmp_path / "s.toml", study_text(text_fixtures))
    result = CliRunner().invoke(app, ["study", str(study_file), "--dry-run", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "stage pretrain: 4 run(s)"
    assert (
        "stage finetune: 2 run(s) for each completed run of stage pretrain (up to 8) and 2 more" in lines[5]
    )
    assert lines[-1] == f"14 runs -> {tmp_path / 'out'}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("finetune", "grid", "message"),
    [
        ("seed = -1", None, r"stage\[1\]\.base: seed must be an integer"),
        (
            "",
            'workload.model.path = [{ from_stage = "nope" }]',
            r"stage\[0\]\.grid\[0\]\.workload\.model\.path\[0\] = \{ from_stage = 'nope' \}: no earlier stage is called 'nope' "
            r"\(the first stage starts from nothing\)",
        ),
        (
            "",
            'workload.model.path = [{ from_stage = "pretrain", seed = 1 }]',
            r"a reference to an earlier stage is \{ from_stage = \"NAME\" \}",
        ),
    ],
)
def test_the_whole_file_is_checked_before_anything_runs(tmp_path, text_fixtures, finetune, grid, message):
    text = study_text(text_fixtures, pretrain_grid=grid, finetune=finetune)
    with pytest.raises(ConfigError, match=message):
        load_study(write(tmp_path / "s.toml", text))


def test_stage_tables_are_checked(tmp_path, text_fixtures):
    text = study_text(text_fixtures)
    with pytest.raises(ConfigError, match=r"a study of \[\[stage\]\] tables has no top-level \['base'\]"):
        load_study(write(tmp_path / "a.toml", text + "\n[base]\nworkers = 1\n"))
    with pytest.raises(ConfigError, match=r"stage\[1\]\.name = 'pretrain' names an earlier stage too"):
        load_study(write(tmp_path / "b.toml", text.replace('name = "finetune"', 'name = "pretrain"')))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stage\[1\]\.after'\]"):
        load_study(
            write(tmp_path / "c.toml", text.replace('name = "finetune"', 'name = "finetune"\nafter = 1'))
        )


def fail_one(victim: str, executed: list[str], stop_after: int | None = None) -> Any:
    """Run every run for real but ``victim``, which fails as a crashed run does; with
    ``stop_after``, the study is interrupted before the run after that many of the later
    stage's."""
    later: list[str] = []

    def execute(config: Any, store: Store) -> str:
        if config.workload_name == "classification":
            if len(later) == stop_after:
                raise KeyboardInterrupt
            later.append(config.run_id())
        executed.append(config.run_id())
        if config.run_id() == victim:
            store.begin(victim, config.name, config.to_dict())
            return store.finish(victim, error=ErrorInfo("RuntimeError", "the worker crashed"))
        return execute_run(config, store)

    return execute


def test_two_stages_end_to_end(tmp_path, text_fixtures):
    import torch
    from safetensors.torch import load_file

    from localsgd import workloads
    from localsgd.report import make_report

    grid = (
        'workers = [1]\nalgorithm = [{ name = "minibatch_sgd" }, { name = "local_sgd", period = 2 }]\n'
        '[[stage.grid]]\nworkers = [2]\nalgorithm = [{ name = "minibatch_sgd" }]'
    )
    study = load_study(write(tmp_path / "s.toml", study_text(text_fixtures, pretrain_grid=grid)))
    out = tmp_path / "store"
    pretrain = study.stages[0].runs
    victim = pretrain[1].run_id()  # local SGD on one worker
    executed: list[str] = []
    with pytest.raises(KeyboardInterrupt):  # stopped after 2 runs of the second stage
        stages.run_stages(study, out, run=run_study, execute=fail_one(victim, executed, 2), progress=False)
    first_plan = json.loads((out / "plan.json").read_text())
    executed.clear()
    counts = stages.run_stages(study, out, run=run_study, execute=fail_one(victim, executed), progress=False)
    assert counts == {
        "skipped (completed)": 2 + 2,
        "skipped (failed)": 1,
        "completed": 2 * 2 + 2 - 2,
        "skipped (earlier stage)": 2,
    }
    assert len(executed) == 4  # no run of the first stage again, and the second stage's unfinished ones
    plan = json.loads((out / "plan.json").read_text())
    assert plan == first_plan  # the second stage's runs made again: the same ids
    assert [s["name"] for s in plan["stages"]] == ["pretrain", "finetune"]
    assert plan["stages"][1] == {
        "name": "finetune",
        "from_stage": "pretrain",
        "runs": 6,
        "fixed_runs": 2,
        "runs_per_source_run": 2,
    }
    assert plan["skipped"] == [
        {
            "stage": "finetune",
            "from_stage": "pretrain",
            "run_id": victim,
            "reason": "failed: RuntimeError: the worker crashed",
            "runs": 2,
        }
    ]
    finetune = [r for r in plan["runs"] if r["stage"] == "finetune"]
    sources = [r["from_run"].get("run_id") for r in finetune]
    completed = [r.run_id() for r in pretrain if r.run_id() != victim]
    assert sorted(s for s in sources if s) == sorted(completed * 2) and sources.count(None) == 2
    for entry in finetune:
        config = json.loads((out / "runs" / entry["run_id"] / "config.json").read_text())["config"]
        assert config["from_run"] == entry["from_run"]  # the run's own record says where it started
        if not entry["from_run"]:
            continue
        source = entry["from_run"]["run_id"]
        exported = out / "runs" / source / "model"
        assert config["workload"]["model"]["path"] == str(exported)
        # What the run started from: the encoder the first stage's run exported.
        model = workloads.build(config["workload"]).make_model(config["seed"])
        saved = load_file(str(exported / "model.safetensors"))
        encoder = [k for k in saved if k.startswith(("bert.embeddings.", "bert.encoder."))]
        assert len(encoder) > 30
        for name in encoder:
            assert torch.equal(model.state_dict()[name], saved[name]), name

    paths = make_report(out, formats=["png"])
    text = paths["markdown"].read_text()
    section = text[text.index("## Stages") :]
    section = section[: section.index("\n## ", 4)]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith(
        "| pretrain configuration | pretrain runs | eval loss (final, test) | wall time (s) | finetune runs |"
    )
    assert "test accuracy (%)" in table[0] and "macro-F1 (%)" in table[0]
    rows = table[1:]  # after the header (the separator row starts "|-")
    assert len(rows) == 1 + 3  # the reference, and one per configuration of the first stage
    assert rows[0].startswith(f"| no pretrain run ({text_fixtures['model']})")
    failed = [row for row in rows if "skipped" in row]
    assert (
        len(failed) == 1
        and f"run {victim} failed: RuntimeError: the worker crashed: its 2 finetune runs skipped" in failed[0]
    )
    assert "| 0/1 |" in failed[0] and "| 0/0 |" in failed[0]
    assert sum("| 1/1 |" in row and "| 2/2 |" in row for row in rows) == 2

    # A rerun finishes nothing twice and makes the same later runs.
    executed.clear()
    again = stages.run_stages(study, out, run=run_study, execute=fail_one(victim, executed), progress=False)
    assert executed == []
    assert again == {"skipped (completed)": 2 + 6, "skipped (failed)": 1, "skipped (earlier stage)": 2}
    assert [r["run_id"] for r in json.loads((out / "plan.json").read_text())["runs"]] == [
        r["run_id"] for r in plan["runs"]
    ]
