"""benchmarks/soak.py at a small size: a study killed by SIGKILL at seeded random moments
and started again each time ends with every run completed once, no process left behind,
and every metrics row equal to the uninterrupted study's but for the timed fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def test_a_study_killed_again_and_again_ends_as_the_uninterrupted_one(tmp_path):
    out = tmp_path / "soak.json"
    # 4 runs, 2 of each engine (they take turns), and 2 kills: the kill moments the seed
    # draws are those it drew first for 6 runs and 3 kills (one run per kill either way).
    args = ["--runs", "4", "--kills", "2", "--steps", "100", "--seed", "3", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), *args],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(out.read_text())
    summary = found["summary"]
    assert found["failures"] == [] and found["mismatches"] == []
    assert summary["completed_once"] is True and summary["mismatches"] == 0
    assert summary["runs"] == 4
    # eval_every = 100 // 4: rows at steps 25, 50, 75 and 100 of every run, all compared.
    assert summary["rows_compared"] == 4 * 4
    assert 1 <= summary["kills"] <= 2 and len(found["kills"]) == summary["kills"]
    assert all(kill["orphans"] == [] for kill in found["kills"])
    assert summary["kills_mid_run"] + summary["kills_between_runs"] == summary["kills"]
    # Every start of store B but the last was killed.
    assert summary["starts_of_B"] == summary["kills"] + 1
    assert set(found["timed_fields_excluded"]) == {
        "wall_seconds",
        "comm_seconds",
        "updates_per_second",
        "by_scope.*.seconds",
    }
    assert "| runs | kills |" in done.stdout
    # The table docs/benchmarks.md shows (benchmarks/render.py), its row the summary's figures.
    [table] = found["tables"]
    assert table["columns"][:2] == ["runs", "kills"] and table["rows"][0][:2] == [str(summary["runs"]), str(summary["kills"])]
    assert table["note"].startswith("Every run completed once in store B")
