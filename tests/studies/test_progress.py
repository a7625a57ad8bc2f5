"""What a study says as it goes: a plain line per finished run, with an ETA from the mean run
time, and what ``localsgd train`` streams from its run's record."""

from __future__ import annotations

import io
import re
import threading
import time
from pathlib import Path

import pytest

from localsgd.records import RECORD_VERSION, ErrorInfo, MetricsRow, RunWriter, Status, Store
from localsgd.run.config import RunConfig, run_config
from localsgd.studies.loading import load_study
from localsgd.studies.progress import StudyProgress, duration, follow_rows, row_line
from localsgd.studies.runner import run_study
from localsgd.workloads.base import ACCURACY
from studies.grids import write

STUDY = """
[study]
name = "lines"
[base]
workload = "mnist1d_mlp"
[[grid]]
workers = [1]
seed = [0]
algorithm = [{name = "minibatch_sgd"}]
[[grid]]
workers = [4]
seed = [0, 1]
algorithm = [{name = "local_sgd", period = 16}, {name = "slowmo", period = 8, outer_momentum = 0.5}]
"""


def scripted(accuracy: dict[int, float], fail: set[str]):
    """Stands in for an engine: a completed run with the given final accuracy per seed, or
    a failed one with its root error."""

    def execute(config: RunConfig, store: Store) -> str:
        run_id = config.run_id()
        folder = store.begin(run_id, config.name, config.to_dict())
        writer = RunWriter(folder)
        row = MetricsRow(10, 1.0, 640, 0.5, 0.1, 0.9, {"accuracy": accuracy[config.seed]})
        writer.row(row)
        writer.close()
        time.sleep(0.01)
        if config.algorithm["name"] in fail:
            error = ErrorInfo("KeyError", "'shard 3 is missing'", rank=3)
            writer.status(Status(RECORD_VERSION, "failed", error=error, final=row))
        else:
            writer.status(
                Status(RECORD_VERSION, "completed", metrics=(ACCURACY,), primary="accuracy", final=row)
            )
        return store.finish(run_id)

    return execute


def test_a_plain_line_per_finished_run_names_variant_workers_seed_status_metric_time_and_eta(tmp_path):
    study = load_study(write(tmp_path / "s.toml", STUDY))
    out = io.StringIO()
    counts = run_study(
        study,
        tmp_path / "store",
        execute=scripted({0: 0.97456, 1: 0.9}, fail={"slowmo"}),
        output=out,
    )
    assert counts == {"completed": 3, "failed": 2}
    header, *lines = out.getvalue().splitlines()
    assert header.startswith("study lines: 5 run(s) to do (0 finished before), 1 at a time on this machine")
    assert len(lines) == 5
    pattern = re.compile(
        r"\[(\d)/5\]\s+(\w+)\s+(.+?)  K=(\d)  seed=(\d)  (.+?)  ([\d.]+ s)  ETA (\S+ s)(?:  error: (.*))?$"
    )
    parsed = [pattern.match(line) for line in lines]
    assert all(parsed), lines
    fields = [m.groups() for m in parsed if m]
    assert [f[0] for f in fields] == ["1", "2", "3", "4", "5"]
    # The variant as the report labels it, never the raw algorithm table.
    assert fields[0][1:6] == ("completed", "minibatch_sgd", "1", "0", "test accuracy 97.46%")
    assert fields[1][1:6] == ("completed", "local_sgd H=16", "4", "0", "test accuracy 97.46%")
    assert fields[2][1:6] == ("failed", "slowmo H=8 μ=0.5 η=1", "4", "0", "test accuracy 97.46%")
    assert fields[2][8] == "KeyError: 'shard 3 is missing' (rank 3)"
    assert fields[3][1:6] == ("completed", "local_sgd H=16", "4", "1", "test accuracy 90%")
    assert fields[4][1] == "failed" and fields[4][7] == "0.0 s"  # nothing left
    assert [f[8] is not None for f in fields] == [False, False, True, False, True]


def test_eta_is_the_mean_run_time_times_the_runs_left_over_the_parallel_slots():
    run = run_config({"workload": "mnist1d_mlp"})
    progress = StudyProgress("eta", 10, parallel=2, output=io.StringIO(), terminal=False)
    assert progress.eta() is None
    progress.finished(run, "completed", None, 30.0)
    progress.finished(run, "completed", None, 10.0)
    # mean 20 s x 8 runs left / 2 at a time = 80 s
    assert progress.eta() == pytest.approx(80.0, abs=0.5)
    assert progress.output.getvalue().splitlines()[-1].endswith("ETA 1 min 20 s")  # type: ignore[attr-defined]


def test_a_terminal_gets_a_bar_with_the_mean_eta_and_the_same_lines(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    run = run_config({"workload": "mnist1d_mlp", "workers": 2})
    with StudyProgress("bar", 3, output=out) as progress:
        assert progress.terminal
        progress.started(run)
        progress.finished(run, "completed", None, 100.0)
    text = out.getvalue()
    assert "minibatch_sgd  K=2  seed=0" in text and "ETA 3 min 20 s" in text


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (4.25, 42, 185, 3720)] == ["4.2 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_following_a_runs_rows_sees_each_row_once_across_the_rename(tmp_path: Path):
    partial, final = tmp_path / "run.partial", tmp_path / "run"
    partial.mkdir()
    seen: list[str] = []
    writer = RunWriter(partial)

    def train() -> None:
        for step in (5, 10, 15):
            writer.row(MetricsRow(step, step / 10, 16 * step, 0.1, 0.1, 2.0 / step, {"accuracy": step / 20}))
            time.sleep(0.05)
        writer.close()
        partial.rename(final)

    with follow_rows(
        [partial / "metrics.jsonl", final / "metrics.jsonl"],
        lambda r: seen.append(row_line(r, ACCURACY)),
        interval=0.01,
    ):
        thread = threading.Thread(target=train)
        thread.start()
        thread.join()
    assert seen == [
        "step 5 (epoch 0.50): train loss 0.4000, test accuracy 25%",
        "step 10 (epoch 1.00): train loss 0.2000, test accuracy 50%",
        "step 15 (epoch 1.50): train loss 0.1333, test accuracy 75%",
    ]
