"""Smoke test of examples/quickstart.py: it trains under torchrun (2 ranks) and alone, and
what it reports about communication follows from the algorithm's period.

Each run is a fresh process tree with a timeout, so a hung collective fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import LAUNCHER_VARS, run_in_session

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart.py"

# Small enough to finish in seconds: 2000 samples -> 1600 train, 400 test.
NUM_SAMPLES = 2000
N_TRAIN = int(NUM_SAMPLES * 0.8)  # mnist1d's default train_split
EPOCHS = 10
BATCH = 32
TIMEOUT = 150  # seconds for one run; a 2-rank run takes ~7 s on 2 idle cores


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One XDG cache for the module: the first run generates MNIST-1D, later ones read it."""
    return tmp_path_factory.mktemp("xdg_cache")


def parameter_count() -> int:
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sum(p.numel() for p in module.ConvNet().parameters())


def run_example(launcher: list[str], flags: list[str], cache: Path) -> tuple[float, dict[str, Any], str]:
    """Run the example; return its final test accuracy, its stats and its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        XDG_CACHE_HOME=str(cache),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])),
    )
    cmd = [
        sys.executable,
        *launcher,
        str(EXAMPLE),
        *flags,
        "--num-samples",
        str(NUM_SAMPLES),
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        str(BATCH),
    ]
    returncode, out, err = run_in_session(cmd, env, ROOT, TIMEOUT)
    assert returncode == 0, f"{cmd} exited {returncode}\n{out}\n{err[-4000:]}"
    accuracy = re.search(r"^test_accuracy=([0-9.]+)$", out, re.M)
    stats = re.search(r"^stats=(\{.*\})$", out, re.M)
    assert accuracy and stats, f"no test_accuracy/stats line in the output:\n{out}"
    return float(accuracy.group(1)), json.loads(stats.group(1)), out


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.mark.timeout(2 * TIMEOUT)
@pytest.mark.parametrize(
    "flags, syncs_for",
    [
        # Every 8th step averages; the last, partial period is averaged on exit.
        (["--algorithm", "local_sgd", "--period", "8"], lambda steps: math.ceil(steps / 8)),
        # Gradients averaged before every step; nothing left to average on exit.
        (["--algorithm", "minibatch_sgd"], lambda steps: steps),
    ],
    ids=["local_sgd_H8", "minibatch_sgd"],
)
def test_two_ranks_train_and_count_one_collective_per_sync(flags, syncs_for, cache_dir):
    world = 2
    accuracy, stats, out = run_example(TORCHRUN, flags, cache_dir)

    # Chance is 0.1; these short runs reach 0.51-0.63 over seeds 0-3 for both algorithms.
    assert accuracy > 0.3, out
    # Only rank 0 prints: one line per epoch, not one per rank.
    assert len(re.findall(r"^epoch ", out, re.M)) == EPOCHS, out

    steps = EPOCHS * ((N_TRAIN // world) // BATCH)  # every rank takes the same full batches
    assert stats["steps"] == steps
    assert stats["syncs"] == syncs_for(steps)
    # One float32 collective per sync over every parameter: the CNN has no buffers, and
    # neither the entry broadcast, the consensus() evaluations nor the train-loss
    # bookkeeping are counted.
    assert stats["collectives"] == stats["syncs"]
    assert stats["bytes"] == stats["collectives"] * 4 * parameter_count()
    assert stats["by_scope"].keys() == {"world"}
    assert stats["by_scope"]["world"]["collectives"] == stats["collectives"]
    assert stats["by_scope"]["world"]["bytes"] == stats["bytes"]
    assert list((cache_dir / "localsgd").glob(f"mnist1d_n{NUM_SAMPLES}_*.npz"))


@pytest.mark.timeout(2 * TIMEOUT)
def test_plain_python_is_a_world_of_one_and_communicates_nothing(cache_dir):
    accuracy, stats, out = run_example([], ["--algorithm", "local_sgd", "--period", "8"], cache_dir)

    assert accuracy > 0.5, out  # one worker, twice the steps: 0.75-0.77 over seeds 0-3
    steps = EPOCHS * (N_TRAIN // BATCH)
    assert stats["steps"] == steps
    assert stats["syncs"] == math.ceil(steps / 8)  # the schedule runs; averaging is a no-op
    assert stats["collectives"] == 0
    assert stats["bytes"] == 0
    assert stats["by_scope"] == {}


# -- your own workload: examples/own_workload.py through `localsgd study` -----------------------


def test_own_workload_runs_in_both_engines_and_its_metric_reaches_the_report(tmp_path):
    """examples/own_run.toml as a newcomer runs it from the repository root: one worker,
    K = 2 worker processes and K = 4 simulated replicas of a regression model with dict
    batches, MSE loss and R²."""
    import pandas as pd

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "store"
    study = [sys.executable, "-m", "localsgd.cli", "study", "examples/own_run.toml", "--out", str(out)]
    done = subprocess.run(
        [*study, "--set", "train.max_steps=60"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 completed" in done.stdout
    report = subprocess.run(
        # The tables and report.md asserted below; PNG alone of the figure formats.
        [sys.executable, "-m", "localsgd.cli", "report", str(out), "--format", "png"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    summary = pd.read_excel(out / "report" / "results.xlsx", sheet_name="summary")
    assert {"final_r2_mean", "final_eval_mse_mean", "best_r2_mean"} <= set(summary.columns)
    engines = dict(zip(summary["workers"], summary["engine"]))
    assert engines[2] == "processes" and engines[4] == "simulated"
    # 60 steps of a learnable regression: well above R² = 0 (predicting the mean).
    assert (summary["final_r2_mean"] > 0.2).all(), summary[["variant", "workers", "final_r2_mean"]]
    text = (out / "report" / "report.md").read_text()
    assert "final R² |" in text and "primary: R²" in text
    assert "R², higher is better, eval MSE, lower is better" in text


@pytest.mark.parametrize(
    "command,workload,message",
    [
        ("train", "nosuchmodule:f", "workload = 'nosuchmodule:f': cannot import 'nosuchmodule'"),
        ("train", "os:getcwd", "workload = 'os:getcwd' returned str, not a workload"),
        ("study", "nosuchmodule:f", "workload = 'nosuchmodule:f': cannot import 'nosuchmodule'"),
        # The study's [base.workload] options do not fit os.getcwd, which takes none.
        ("study", "os:getcwd", "unknown key 'workload.num_samples'; allowed: []"),
    ],
)
def test_a_bad_import_path_is_a_one_line_error_before_any_record(
    tmp_path, monkeypatch, command, workload, message
):
    # Through the app in this process: the refusal comes before any worker starts, so a
    # fresh interpreter would prove nothing more than the exit code and stderr seen here.
    from typer.testing import CliRunner

    from localsgd.cli import app

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)
    (tmp_path / "run.toml").write_text("workers = 2\n")
    config = "examples/own_run.toml" if command == "study" else str(tmp_path / "run.toml")
    out = tmp_path / "out"
    done = CliRunner().invoke(app, [command, config, "--out", str(out), "--set", f"workload.name={workload}"])
    assert done.exit_code == 2, (done.stderr, done.exception)
    assert done.stderr.strip() == f"error: {message}" or (
        done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr
    ), done.stderr
    assert not out.exists(), f"{command} created {out} for a rejected config"
