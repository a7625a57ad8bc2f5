"""End to end through the ``localsgd`` command: train, study, report, kill and resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import LAUNCHER_VARS, worker_command

pytestmark = pytest.mark.timeout(600)


BASE = """
[base.workload]
name = "mnist1d_cnn"
num_samples = 1000
[base.data]
batch_size = 16
[base.train]
epochs = 1
max_steps = {max_steps}
eval_every = 5
"""


@pytest.fixture(scope="module")
def env(data_cache: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    out["XDG_CACHE_HOME"] = data_cache
    out["OMP_NUM_THREADS"] = "1"
    return out


def cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localsgd.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def write_study(path: Path, grids: str, max_steps: int = 20, name: str = "tiny") -> Path:
    path.write_text(f'[study]\nname = "{name}"\n' + BASE.format(max_steps=max_steps) + grids)
    return path


TINY_GRIDS = """
[[grid]]
workers = [1]
seed = [0]

[[grid]]
workers = [2]
seed = [0]
algorithm = [{name = "minibatch_sgd"}, {name = "local_sgd", period = 4}]
"""


def config_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())["config"]


def read_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f]


def test_tiny_study_through_the_cli_produces_every_report_file(tmp_path, env):
    import pandas as pd

    study = write_study(tmp_path / "tiny.toml", TINY_GRIDS)
    out = tmp_path / "store"
    done = cli(["study", str(study), "--out", str(out)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 completed" in done.stdout
    runs = sorted(p for p in (out / "runs").iterdir())
    assert len(runs) == 3
    for run in runs:
        for name in ("config.json", "env.json", "metrics.jsonl", "status.json", "checkpoint.pt"):
            assert (run / name).stat().st_size > 0, f"{run.name}/{name}"
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "completed" and status["steps"] == 20
        rows = read_rows(run)
        assert [r["step"] for r in rows] == [5, 10, 15, 20]
        env_info = json.loads((run / "env.json").read_text())
        assert env_info["torch"] and env_info["world_size"] == config_of(run)["workers"]

    reported = cli(["report", str(out)], env, tmp_path)
    assert reported.returncode == 0, reported.stderr
    report = out / "report"
    for name in ("report.md", "report.html", "results.xlsx"):
        assert (report / name).stat().st_size > 0
    assert len(list(report.glob("*.png"))) >= 5
    html = (report / "report.html").read_text()
    assert "data:image/png;base64," in html

    # The tables' numbers, recomputed from the raw JSONL.
    sheets = pd.read_excel(report / "results.xlsx", sheet_name=None)
    runs_sheet = sheets["runs"]
    assert len(runs_sheet) == 3
    finals = {}
    for run in runs:
        config = config_of(run)
        rows = read_rows(run)
        finals[(config["workers"], config["algorithm"]["name"])] = (
            rows[-1]["metrics"]["accuracy"],
            rows[-1]["wall_seconds"],
        )
    summary = next(df for name, df in sheets.items() if name not in ("runs", "metrics", "status"))
    acc_col = next(
        c for c in summary.columns if "final" in c.lower() and "acc" in c.lower() and "std" not in c.lower()
    )
    workers_col = next(c for c in summary.columns if c.lower() in ("workers", "k", "workers k"))
    recomputed = sorted(a for a, _ in finals.values())
    assert sorted(summary[acc_col].astype(float)) == pytest.approx(recomputed, abs=1e-9)
    speed_col = next(c for c in summary.columns if "speedup" in c.lower() and "std" not in c.lower())
    baseline_wall = finals[(1, "minibatch_sgd")][1]
    for _, row in summary.iterrows():
        if int(row[workers_col]) == 2:
            match = [
                w
                for (k, _), (a, w) in finals.items()
                if k == 2 and a == pytest.approx(row[acc_col], abs=1e-12)
            ]
            assert match and row[speed_col] == pytest.approx(baseline_wall / match[0], rel=1e-9)


def test_killed_study_resumes_without_duplicate_or_lost_rows(tmp_path, env):
    grids = """
[[grid]]
workers = [2]
seed = [0, 1, 2]
algorithm = [{name = "local_sgd", period = 2}]
[grid.train]
epochs = 10
"""
    study = write_study(tmp_path / "kill.toml", grids, max_steps=200)
    out = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "localsgd.cli", "study", str(study), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )

    def under_way() -> bool:
        """A run completed and the next one has written rows."""
        if not (out / "index.sqlite").exists():
            return False
        with sqlite3.connect(out / "index.sqlite") as db:
            completed = db.execute("SELECT COUNT(*) FROM runs WHERE status='completed'").fetchone()[0]
        partial = [p / "metrics.jsonl" for p in (out / "runs").glob("*.partial")]
        return completed >= 1 and any(p.exists() and p.read_text().count("\n") >= 2 for p in partial)

    try:
        deadline = time.time() + 240
        while time.time() < deadline and not under_way():
            time.sleep(0.05)
        assert under_way(), "no run completed in time"
    finally:
        # The study's process alone: its pool's workers notice and leave by themselves.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with sqlite3.connect(out / "index.sqlite") as db:
        before = dict(db.execute("SELECT run_id, status FROM runs").fetchall())
    assert 1 <= list(before.values()).count("completed") < 3

    again = cli(["study", str(study), "--out", str(out)], env, tmp_path)
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(out / "index.sqlite") as db:
        after = db.execute("SELECT run_id, status, attempts FROM runs").fetchall()
    assert len(after) == 3 and all(status == "completed" for _, status, _ in after)
    assert not list((out / "runs").glob("*.partial"))
    for run_id, _, _ in after:
        steps = [r["step"] for r in read_rows(out / "runs" / run_id)]
        assert steps == list(range(5, 201, 5)), run_id  # nothing lost, nothing twice
    # Runs finished before the kill were not redone.
    for run_id, _, attempts in after:
        if before.get(run_id) == "completed":
            assert attempts == 1


def test_huge_learning_rate_is_recorded_as_diverged(tmp_path, env):
    run = tmp_path / "run.toml"
    run.write_text(
        'workers = 2\n[workload]\nname = "mnist1d_mlp"\nnum_samples = 1000\n[data]\nbatch_size = 16\n'
        "[optimizer]\nlr = 1e6\nnesterov = false\nmomentum = 0.0\n[train]\nepochs = 1\nmax_steps = 40\neval_every = 5\n"
    )
    done = cli(["train", str(run), "--out", str(tmp_path / "runs")], env, tmp_path)
    assert done.returncode == 1, done.stderr
    assert "error: Diverged: train loss is" in done.stderr
    (record,) = (tmp_path / "runs" / "runs").iterdir()
    # Rank 0's evaluations as they came, then how the run ended and where it is.
    lines = done.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert steps and steps[0].startswith("step 5 (epoch ") and ": train loss " in steps[0]
    assert "test accuracy" in steps[0] and steps[0].endswith("%")
    assert lines[-2].startswith("diverged: test accuracy ") and lines[-1] == f"run folder: {record}"
    status = json.loads((record / "status.json").read_text())
    assert status["status"] == "diverged" and "train loss is" in status["error"]["message"]
    rows = read_rows(record)
    # Strict JSON has no inf or NaN: the non-finite loss is a null, the message says which.
    assert rows[-1]["train_loss"] is None and rows[-1]["step"] < 40
    assert all(r["train_loss"] is None or math.isfinite(r["train_loss"]) for r in rows)


def invoke(args: list[str]) -> Any:
    """The command in this process (its exit code and stderr, as a shell sees them): for
    refusals, which come before any worker starts, a fresh interpreter proves nothing more."""
    from typer.testing import CliRunner

    from localsgd.cli import app

    return CliRunner().invoke(app, args)


def test_cli_rejects_bad_configs_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run.toml"
    run.write_text("workers = 2\n[optimizer]\nlr = 0.1\n")
    bad = invoke(["train", str(run), "--set", "optimizer.lr=fast"])
    assert bad.exit_code == 2 and "optimizer.lr must be a number, got str 'fast'" in bad.stderr
    study = write_study(tmp_path / "s.toml", "[[grid]]\nworkers = [3]\nglobal_batch = 64\n")
    bad = invoke(["study", str(study)])
    assert bad.exit_code == 2 and "global_batch = 64 is not divisible by workers = 3" in bad.stderr
    bad = invoke(["report", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "is not a localsgd store" in bad.stderr
    assert not (tmp_path / "studies_out").exists()  # nothing written for a rejected study


def test_worker_entry_point_under_torchrun_records_the_run(tmp_path, env):
    """The multi-node path: torchrun starts `-m localsgd.worker` itself; rank 0 owns the store."""
    run = tmp_path / "run.toml"
    run.write_text(
        'workers = 2\ndevice = "cpu"\n[workload]\nname = "mnist1d_mlp"\nnum_samples = 1000\n[algorithm]\nname = "local_sgd"\nperiod = 4\n'
        "[data]\nbatch_size = 16\n[train]\nepochs = 1\nmax_steps = 12\neval_every = 6\n"
    )
    command = worker_command(2, str(run), "--out", str(tmp_path / "store"))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    (record,) = (tmp_path / "store" / "runs").iterdir()
    status = json.loads((record / "status.json").read_text())
    assert status["status"] == "completed", done.stderr[-3000:]
    assert status["steps"] == 12 and status["counters"]["syncs"] == 3
    assert [r["step"] for r in read_rows(record)] == [6, 12]
    with sqlite3.connect(tmp_path / "store" / "index.sqlite") as db:
        assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]


def test_a_failed_run_makes_exit_code_1_and_the_next_run_completes_on_a_fresh_pool(tmp_path, env):
    from engines.test_processes import FLAKY

    (tmp_path / "flaky.py").write_text(FLAKY)
    study = tmp_path / "flaky.toml"
    study.write_text(
        '[study]\nname = "flaky"\n[base]\nworkers = 2\ndevice = "cpu"\n[base.workload]\nname = "flaky:make"\n'
        "[base.data]\nbatch_size = 16\n[base.train]\nepochs = 1\nmax_steps = 6\neval_every = 3\n"
        "[[grid]]\nworkload.fail_rank = [1, 7]\n"
    )
    done = cli(["study", str(study), "--out", "store"], env, tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].startswith("[1/2]  failed     minibatch_sgd  K=2  seed=0  -  ")
    assert lines[1].endswith("error: KeyError: 'shard 1 is missing from the bucket' (rank 1)")
    # The crash killed its pool; the next run got a fresh one and completed.
    assert lines[2].startswith("[2/2]  completed  minibatch_sgd  K=2  seed=0  test accuracy ")
    assert lines[3] == "study flaky: 1 completed, 1 failed; store: store"
    assert "1 of 2 runs failed or diverged" in done.stderr and "--retry-failed" in done.stderr
    statuses = {
        json.loads((p / "config.json").read_text())["config"]["workload"]["fail_rank"]: json.loads(
            (p / "status.json").read_text()
        )
        for p in (tmp_path / "store" / "runs").iterdir()
    }
    assert statuses[1]["status"] == "failed" and statuses[1]["error"]["type"] == "KeyError"
    assert statuses[7]["status"] == "completed" and statuses[7]["steps"] == 6


def test_parallel_runs_beyond_the_cores_are_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = write_study(tmp_path / "s.toml", TINY_GRIDS)
    cores = len(os.sched_getaffinity(0))
    done = invoke(["study", str(study), "--out", "store", "--parallel", str(cores)])
    assert done.exit_code == 2
    assert f"error: --parallel {cores} runs up to {cores} x 2 worker process(es) x 1 thread(s)" in done.stderr
    assert "--oversubscribe" in done.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was written


def test_every_commands_help_shows_its_words(tmp_path):
    from typer.main import get_command
    from typer.testing import CliRunner

    from localsgd.cli import app

    commands = get_command(app).commands  # type: ignore[attr-defined]
    assert sorted(commands) == ["algorithms", "cluster", "engines", "fixtures", "report", "study", "train", "workloads"]
    runner = CliRunner()
    for name, command in commands.items():
        shown = " ".join(runner.invoke(app, [name, "--help"], terminal_width=200).output.split())
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            for word in re.findall(r"\S*\[\S*", text):  # what markup would take for tags
                assert word in shown, (name, word)
    study_help = runner.invoke(app, ["study", "--help"], terminal_width=200).output
    assert "Study file (TOML): [study], [base] and [[grid]] blocks." in study_help
    assert "[study].out" in study_help


def test_slurm_executor_through_submitits_local_executor_fills_the_same_store(tmp_path, env, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.chdir(tmp_path)
    grids = '[[grid]]\nworkers = [1, 2]\nseed = [0]\nalgorithm = [{name = "local_sgd", period = 4}]\n'
    study = write_study(tmp_path / "s.toml", grids, name="cluster")
    bad = invoke(["study", str(study), "--executor", "slurm", "--slurm", "cluster=local", "--slurm", "bogus=1"])
    assert bad.exit_code == 2 and "error: --slurm: " in bad.stderr and "bogus" in bad.stderr
    args = ["study", str(study), "--out", "store", "--executor", "slurm", "--slurm", "cluster=local"]
    done = cli([*args, "--parallel", "2", "--oversubscribe"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 at a time as Slurm jobs (submitit's local executor)" in done.stdout
    assert "study cluster: 2 completed; store: store" in done.stdout
    store = tmp_path / "store"
    for run in (store / "runs").iterdir():
        workers = config_of(run)["workers"]
        status = json.loads((run / "status.json").read_text())
        assert status["status"] == "completed" and status["steps"] == 20
        assert [r["step"] for r in read_rows(run)] == [5, 10, 15, 20]
        assert json.loads((run / "env.json").read_text())["world_size"] == workers
        # Two tasks met through rank 0's address in the run folder; one task needs none.
        assert len(list(run.glob("rendezvous-*.json"))) == (1 if workers == 2 else 0)
    logs = list((store / "slurm").glob("*/*_log.err"))
    assert len(logs) == 3  # a task per worker process: 1 + 2
    with sqlite3.connect(store / "index.sqlite") as db:
        assert db.execute("SELECT status FROM runs").fetchall() == [("completed",), ("completed",)]


def test_dry_run_lists_each_run_with_the_reports_label_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from localsgd.cli import app

    grids = TINY_GRIDS + '\n[[grid]]\nworkers = [2]\nseed = [0]\noptimizer.lr = [0.05]\n'
    study = write_study(tmp_path / "s.toml", grids)
    out = tmp_path / "store"
    shown = CliRunner().invoke(app, ["study", str(study), "--out", str(out), "--dry-run"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    # Settings beyond the label are shown where they differ between the runs.
    assert re.fullmatch(r"[0-9a-f]{12}  minibatch_sgd  K=1  seed=0  B=\d+  optimizer.lr=0.1", lines[0]), lines[0]
    assert lines[-2].endswith("K=2  seed=0  B=16  optimizer.lr=0.05"), lines[-2]
    assert lines[-1] == f"{len(lines) - 1} runs -> {out}"
    assert "{" not in shown.output  # no raw config dicts
    assert not out.exists()
