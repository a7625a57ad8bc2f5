"""The runner: resumable studies, no duplicates, the study copy in the store."""

from __future__ import annotations

import pytest

from localsgd.records import RECORD_VERSION, MetricsRow, RunWriter, Status, Store
from localsgd.run.config import RunConfig
from localsgd.studies.loading import load_study
from localsgd.studies.runner import run_study
from studies.grids import STUDY, write


def fake_execute(kill_at: set[str] | None = None, executed: list[str] | None = None):
    """Stands in for the process engine: writes a two-row record, or dies mid-run."""

    def execute(config: RunConfig, store: Store) -> str:
        run_id = config.run_id()
        folder = store.begin(run_id, config.name, config.to_dict())
        if executed is not None:
            executed.append(run_id)
        writer = RunWriter(folder)
        for step in (1, 2):
            writer.row(MetricsRow(step, step / 10, 64 * step, 0.1 * step, 0.1, 1.0, {"accuracy": 0.5}))
            if kill_at and run_id in kill_at:
                writer.close()
                raise KeyboardInterrupt  # killed half-way: one row written, no status
        writer.close()
        writer.status(Status(RECORD_VERSION, "completed"))
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


def test_rerunning_from_the_stores_own_study_copy(tmp_path):
    study_file = write(tmp_path / "s.toml", STUDY)
    out = tmp_path / "store"
    run_study(load_study(study_file), out, study_file=study_file, execute=fake_execute(), progress=False)
    copy = out / "study.toml"
    counts = run_study(load_study(copy), out, study_file=copy, execute=fake_execute(), progress=False)
    assert counts == {"skipped (completed)": 12}


def test_parallel_runs_that_would_oversubscribe_the_cores_are_refused():
    from localsgd.run.config import run_config
    from localsgd.studies.executors.local import check_parallel
    from localsgd.util.checks import ConfigError

    runs = [run_config({"workers": 1}), run_config({"workers": 4, "threads": 2}), run_config({"workers": 2})]
    check_parallel(runs, 2, cores=16)  # 2 x 4 x 2 = 16 threads fit
    with pytest.raises(ConfigError) as caught:
        check_parallel(runs, 2, cores=8)
    assert str(caught.value) == (
        "--parallel 2 runs up to 2 x 4 worker process(es) x 2 thread(s) = 16 threads at once "
        "(the widest run: workers = 4, threads = 2), and this machine has 8 cores; run them one "
        "at a time, or pass --oversubscribe to share the cores anyway"
    )
    with pytest.raises(ConfigError, match=r"= 24 threads .* 16 cores; use --parallel 2 or less"):
        check_parallel(runs, 3, cores=16)
    check_parallel(runs, 2, cores=16, oversubscribe=True)
    check_parallel(runs, 1, cores=1)  # one run at a time is the run config's business
    check_parallel(runs[:1], 16, cores=1)  # one run: nothing runs beside it
    check_parallel(runs[:2], 3, cores=16)  # two runs: the third slot stays idle
    with pytest.raises(ConfigError, match="--parallel must be an integer >= 1, got 0"):
        check_parallel(runs, 0)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused_before_any_record(tmp_path):
    from localsgd.run.config import run_config
    from localsgd.run.execute import preflight
    from localsgd.util.checks import ConfigError

    run = run_config(
        {"workers": 2, "device": "cuda", "workload": {"name": "mnist1d_mlp", "num_samples": 1000}}
    )
    with pytest.raises(ConfigError, match=r"device = 'cuda' with workers = 2 needs 2 CUDA device\(s\)"):
        preflight([run])
    preflight([run], local=False)  # on a cluster, the nodes have the devices


def test_parallel_slots_each_take_runs_until_none_is_left(tmp_path):
    import threading

    study = load_study(write(tmp_path / "s.toml", STUDY))
    threads: set[str] = set()
    executed: list[str] = []
    inner = fake_execute(executed=executed)

    def execute(config: RunConfig, store: Store) -> str:
        threads.add(threading.current_thread().name)
        return inner(config, store)

    counts = run_study(
        study, tmp_path / "store", execute=execute, progress=False, parallel=3, oversubscribe=True
    )
    assert counts == {"completed": len(study.runs)}
    assert sorted(executed) == sorted(r.run_id() for r in study.runs)  # each once
    assert len(threads) > 1 and all(name.startswith("study-slot") for name in threads)


def test_a_store_belongs_to_its_study_unless_another_adopts_it(tmp_path):
    from localsgd.util.checks import ConfigError

    study = load_study(write(tmp_path / "s.toml", STUDY))
    out = tmp_path / "store"
    run_study(study, out, execute=fake_execute(), progress=False)
    plan = (out / "plan.json").read_text()
    beta = load_study(write(tmp_path / "b.toml", STUDY.replace('name = "grid-test"', 'name = "beta"')))
    with pytest.raises(ConfigError) as caught:
        run_study(beta, out, execute=fake_execute(), progress=False)
    assert str(caught.value).startswith(
        f"store {out} belongs to study 'grid-test', not 'beta'; give another --out, or pass --adopt-store"
    )
    assert (out / "plan.json").read_text() == plan  # refused before anything was written
    # Adopted: the plan is beta's, and the runs grid-test finished stay beside beta's (the
    # runs' names are their study's, so none is shared).
    counts = run_study(beta, out, execute=fake_execute(), progress=False, adopt_store=True)
    assert counts == {"completed": len(beta.runs)}
    assert Store(out).plan()["study"] == "beta"
    assert len(Store(out).records()) == len(study.runs) + len(beta.runs)
    assert run_study(beta, out, execute=fake_execute(), progress=False) == {
        "skipped (completed)": len(beta.runs)
    }


def test_a_store_of_single_runs_is_not_taken_by_a_study_unasked(tmp_path):
    from localsgd.util.checks import ConfigError

    out = tmp_path / "store"
    Store(out).begin("abc", "single", {})
    study = load_study(write(tmp_path / "s.toml", STUDY))
    with pytest.raises(ConfigError, match=r"holds 1 run\(s\) recorded by localsgd train, not by a study"):
        run_study(study, out, execute=fake_execute(), progress=False)
    assert not (out / "plan.json").exists()


def test_a_second_study_on_a_locked_store_is_refused_before_reading_it(tmp_path):
    import os

    from localsgd.records.lock import StoreInUse

    study = load_study(write(tmp_path / "s.toml", STUDY))
    out = tmp_path / "store"
    run_study(study, out, execute=fake_execute(), progress=False)
    with Store.lock_for_study(out), pytest.raises(StoreInUse, match=f"^store {out} is in use by PID {os.getpid()}"):
        run_study(study, out, execute=fake_execute(), progress=False)


def test_corrupt_store_files_are_named_with_what_to_do(tmp_path):
    import shutil

    from localsgd.util.checks import ConfigError

    study = load_study(write(tmp_path / "s.toml", STUDY))
    out = tmp_path / "store"
    run_study(study, out, execute=fake_execute(), progress=False)
    first, second = (r.run_id() for r in study.runs[:2])
    status = out / "runs" / first / "status.json"
    status.write_text('{"version": 2, "status": "compl')
    with pytest.raises(ConfigError, match=rf"{status} is unreadable .*; delete the run folder to redo the run"):
        run_study(study, out, execute=fake_execute(), progress=False)
    shutil.rmtree(out / "runs" / first)
    # The study owns the store (its index says so): it writes a corrupt plan.json again.
    (out / "plan.json").write_bytes(b"\xff\xfe garbage")
    # A run whose folder is gone is done again; the others are not.
    executed: list[str] = []
    counts = run_study(study, out, execute=fake_execute(executed=executed), progress=False)
    assert executed == [first] and counts["completed"] == 1
    assert second not in executed
    assert Store(out).plan()["study"] == "grid-test"
    # A store whose index does not name its study (an older one) goes by plan.json.
    import sqlite3

    with sqlite3.connect(out / "index.sqlite") as db:
        db.execute("DROP TABLE meta")
    (out / "plan.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"plan\.json is malformed: expected a JSON object; delete it"):
        run_study(study, out, execute=fake_execute(), progress=False)


def test_the_store_path_is_checked_before_anything_is_written(tmp_path):
    from localsgd.util.checks import ConfigError

    study = load_study(write(tmp_path / "s.toml", STUDY))
    afile = write(tmp_path / "afile", "x")
    with pytest.raises(ConfigError, match=r"--out '.*afile' is a file; give a folder"):
        run_study(study, afile, execute=fake_execute(), progress=False)
    with pytest.raises(ConfigError, match=r"cannot be created: '.*afile' is a file"):
        run_study(study, afile / "store", execute=fake_execute(), progress=False)
    project = tmp_path / "project"
    project.mkdir()
    write(project / "notes.txt", "mine")
    with pytest.raises(ConfigError, match=r"is a folder that is not a localsgd store \(it holds 'notes.txt'\)"):
        run_study(study, project, execute=fake_execute(), progress=False)
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]
