"""benchmarks/search.py at a small size: it runs both searches and the bound, and its JSON
has the ratios and tables the docs are rendered from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def test_the_search_benchmark_reports_its_ratios_and_tables(tmp_path):
    out = tmp_path / "search.json"
    args = ["--quick", "--trials", "4", "--steps", "4", "--reps", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "search.py"), *args],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(out.read_text())
    assert (found["trials"], found["steps"]) == (4, 4)
    names = [(r["name"], r["workload"]) for r in found["ratios"]]
    assert names == [
        (name, workload)
        for workload in ("mnist1d_mlp", "mnist1d_cnn")
        for name in (
            "search: sequential / batched",
            "ceiling: sequential / (wide steps + the rest)",
            "bound: 4 steps at batch 32 / one at 4·32",
            "stacked step / one at batch 4·32",
        )
    ]
    search = found["ratios"][0]
    assert search["target"] == 10.0 and search["reps"] == 1 and search["median"] > 0
    assert found["ratios"][1]["target"] is None and found["ratios"][1]["median"] > 0
    assert found["ratios"][4]["target"] is None  # the CNN's figure is reported, not targeted
    first, second = found["tables"]
    assert [row[0] for row in first["rows"]] == ["mnist1d_mlp", "mnist1d_cnn"]
    assert all(len(row) == len(first["columns"]) for row in first["rows"])
    assert all(len(row) == len(second["columns"]) for row in second["rows"])
    assert found["command"][:2] == ["python", "benchmarks/search.py"]
    assert not (ROOT / "benchmarks" / "results" / "search.quick.json").exists()
