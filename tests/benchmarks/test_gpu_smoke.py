"""benchmarks/gpu_smoke.py, the script prepared for a GPU machine, runs here in its reduced
CPU mode: every run it makes completes, through the engines a GPU run uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_smoke_script_runs_in_its_cpu_mode(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(out.read_text())
    assert found["device"] == "cpu" and found["nccl"] is False
    names = [r["name"] for r in found["runs"]]
    assert names == ["processes K=2", "simulated K=8 fp32", "simulated K=8 bf16", "imagenet_resnet50 fp32"]
    assert all(r["status"] == "completed" and r["steps"] > 0 for r in found["runs"])
    imagenet = found["runs"][-1]
    assert imagenet["steps"] == 3 and imagenet["images_per_second"] > 0
    assert 0.0 <= imagenet["accuracy"] <= 1.0
    assert "x the fp32 steps per second" in done.stdout
    # The structure benchmarks/render.py reads: one ratio per precision against fp32, a table
    # row per run.
    [bf16] = found["ratios"]
    assert bf16["precision"] == "bf16" and bf16["reps"] == 1 and bf16["median"] > 0
    assert [row[0] for row in found["tables"][0]["rows"]] == names
    assert found["machine"]["cores"] >= 1 and found["command"][1] == "benchmarks/gpu_smoke.py"


def test_without_a_gpu_the_full_mode_says_how_to_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py")], capture_output=True, text=True, timeout=60
    )
    if done.returncode == 0:  # a machine with CUDA ran the whole script
        return
    assert done.returncode == 2 and "run with --cpu" in done.stderr
