"""A study says, one warning line each, what it does not do as the store suggests: a run
the index calls finished whose folder is gone is done again, and the rows of a run left
unfinished without a checkpoint are dropped for a fresh start."""

from __future__ import annotations

import logging
import shutil

import pytest

from localsgd.records import Store
from localsgd.studies.loading import load_study
from localsgd.studies.runner import run_study
from studies.grids import STUDY, write
from studies.test_runner import fake_execute

RUNNER = "localsgd.studies.runner"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == RUNNER and r.levelno == logging.WARNING]


def test_a_run_left_unfinished_without_a_checkpoint_is_said_to_start_again(tmp_path, caplog):
    study = load_study(write(tmp_path / "s.toml", STUDY))
    out = tmp_path / "store"
    victim = study.runs[2].run_id()
    with pytest.raises(KeyboardInterrupt):
        run_study(study, out, execute=fake_execute({victim}), progress=False)
    partial = out / "runs" / f"{victim}.partial"
    assert partial.is_dir()

    caplog.set_level(logging.WARNING, logger=RUNNER)
    executed: list[str] = []
    run_study(study, out, execute=fake_execute(executed=executed), progress=False)

    assert _warnings(caplog) == [
        f"run {victim}: {partial}: left unfinished without a checkpoint; it starts again from step 0"
    ]
    assert executed[0] == victim


def test_a_finished_run_whose_folder_is_gone_is_said_to_be_done_again_and_nothing_else(tmp_path, caplog):
    study = load_study(write(tmp_path / "s.toml", STUDY))
    out = tmp_path / "store"
    run_study(study, out, execute=fake_execute(), progress=False)
    gone = study.runs[0].run_id()
    shutil.rmtree(Store(out).run_dir(gone))

    caplog.set_level(logging.WARNING, logger=RUNNER)
    executed: list[str] = []
    counts = run_study(study, out, execute=fake_execute(executed=executed), progress=False)

    assert _warnings(caplog) == [
        f"run {gone}: the index says completed but its folder is gone; it is done again"
    ]
    assert executed == [gone]
    assert counts == {"skipped (completed)": len(study.runs) - 1, "completed": 1}


def test_a_run_left_unfinished_with_a_checkpoint_is_said_to_resume_from_its_step(tmp_path, caplog):
    from localsgd.run.checkpoints import CHECKPOINTS, Checkpoints

    study = load_study(write(tmp_path / "s.toml", STUDY))
    out = tmp_path / "store"
    victim = study.runs[1].run_id()
    with pytest.raises(KeyboardInterrupt):
        run_study(study, out, execute=fake_execute({victim}), progress=False)
    partial = out / "runs" / f"{victim}.partial"
    Checkpoints(partial / CHECKPOINTS, 0, 1, 1, victim).save({"step": 1}, barrier=lambda: None)

    caplog.set_level(logging.WARNING, logger=RUNNER)
    run_study(study, out, execute=fake_execute(), progress=False)

    assert _warnings(caplog) == [f"run {victim}: {partial}: resumes from its checkpoint of step 1"]
