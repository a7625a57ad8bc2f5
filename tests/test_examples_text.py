"""examples/text/finetune.py on the fixtures, as a user runs it: under ``accelerate launch``
(2 processes) with local SGD, and under ``torchrun`` with mini-batch SGD and gradient
accumulation. Each run is a fresh process tree with a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import LAUNCHER_VARS, free_port

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "text" / "finetune.py"


def run(launcher: list[str], fx: dict[str, Path], tmp: Path, task: str, *flags: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        XDG_CACHE_HOME=str(tmp / "cache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])),
    )
    command = [
        *launcher, str(EXAMPLE), "--task", task, "--data_dir", str(fx[task]),
        "--config_name", str(fx["model_config"]), "--tokenizer_name", str(fx["tokenizer"]),
        "--max_length", "64", "--train_subset", "512", "--eval_subset", "64",
        "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", *flags,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout[-3000:]  # the main process prints the results once
    return json.loads(lines[0])


def test_finetune_mnli_under_accelerate_launch_with_local_sgd(tmp_path, text_fixtures):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]  # fmt: skip
    out = run(launcher, text_fixtures, tmp_path, "mnli", "--max_train_steps", "12",
              "--algorithm", '{"name": "local_sgd", "period": 4}', "--output_dir", str(tmp_path / "model"))  # fmt: skip
    assert out["processes"] == 2 and out["updates"] == 12
    assert out["stats"]["steps"] == 12 and out["stats"]["syncs"] == 3 and out["stats"]["collectives"] == 3
    assert set(out["metrics"]) == {"accuracy_matched", "accuracy_mismatched", "eval_loss"}
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "model" / "results.json").read_text())["metrics"] == out["metrics"]


def test_finetune_squad_under_torchrun_with_minibatch_sgd_and_accumulation(tmp_path, text_fixtures):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
    out = run(launcher, text_fixtures, tmp_path, "squad", "--max_train_steps", "4",
              "--gradient_accumulation_steps", "2", "--algorithm", '{"name": "minibatch_sgd"}')  # fmt: skip
    assert out["processes"] == 2 and out["updates"] == 4
    # DDP averaged the gradients of every update (the last micro-batch's backward), no more.
    assert out["stats"]["steps"] == 4 and out["stats"]["syncs"] == 4
    assert out["stats"]["comm_seconds"] == 0.0
    assert set(out["metrics"]) == {"f1", "exact_match", "eval_loss"}
