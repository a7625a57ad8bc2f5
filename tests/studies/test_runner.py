"""The runner: resumable studies, no duplicates, the study copy in the store."""

from __future__ import annotations

import pytest

from localsgd.records import RECORD_VERSION, MetricsRow, RunWriter, Status, Store
from localsgd.studies.grid import load_study
from localsgd.studies.runner import run_study
from localsgd.studies.schema import RunConfig
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
    from localsgd.studies.runner import check_parallel
    from localsgd.studies.schema import run_config
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
    from localsgd.studies.runner import preflight
    from localsgd.studies.schema import run_config
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
