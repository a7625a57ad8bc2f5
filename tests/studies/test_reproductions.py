"""studies/reproductions.py: the command docs/reproductions.md takes its numbers from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from localsgd.records import Store
from localsgd.run.config import RunConfig
from report.records import write_run

SCRIPT = Path(__file__).resolve().parents[2] / "studies" / "reproductions.py"


def run(stores: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--stores", str(stores)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_missing_store_is_named_with_its_command(tmp_path: Path) -> None:
    lines = run(tmp_path)
    assert lines[0] == "## Goyal et al. 2017, Table 1 (warmup)"
    assert f"- not run: no store at {tmp_path / 'warmup'}; run `localsgd study studies/warmup.toml`" in lines
    assert sum(line.startswith("- not run: ") for line in lines) == 7


def test_warmup_errors_are_read_from_the_store(tmp_path: Path) -> None:
    # The four configurations of warmup.toml, two seeds each, with known final accuracies.
    finals = {(32, 0.0, "gradual"): (0.97, 0.97), (512, 0.0, "gradual"): (0.91, 0.93)}
    finals |= {(512, 1.0, "constant"): (0.5, 0.7), (512, 1.0, "gradual"): (0.92, 0.92)}
    store = Store(tmp_path / "warmup")
    for (batch, epochs, kind), accs in finals.items():
        for seed, acc in enumerate(accs):
            config = RunConfig(name="warmup", seed=seed).to_dict()
            config["data"]["batch_size"] = batch
            config["schedule"].update(warmup_epochs=epochs, warmup=kind)
            rows = [{"step": 1, "epoch": 1.0, "samples": batch, "wall_seconds": 1.0, "test_accuracy": acc, "test_loss": 0.1}]
            write_run(store, f"{batch}-{epochs}-{kind}-{seed}", config, rows, "completed")
    lines = run(tmp_path)
    assert lines[1:5] == [
        "- B = 32 (k·n = 32), lr 0.05: test error 3.0 ± 0.0 %",
        "- B = 512, lr 0.8, no warmup: 8.0 ± 1.4 %",
        "- B = 512, constant warmup (1 epoch): 40.0 ± 14.1 %",
        "- B = 512, gradual warmup (1 epoch): 8.0 ± 0.0 %",
    ]
