"""benchmarks/streaming.py at a tiny size (injected delay, no root): it runs every case on a
real gloo world of two processes and writes the JSON docs/benchmarks.md is rendered from,
with a measured/predicted ratio per case, a hidden share per streamed case and the table.
Shape only: no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def test_quick_run_writes_ratios_and_a_table_per_case(tmp_path):
    out = tmp_path / "streaming.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "streaming.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(out.read_text())
    assert found["quick"] is True and found["link"]["kind"] == "delay"
    assert found["command"][:3] == ["python", "benchmarks/streaming.py", "--quick"]
    assert {"date", "cores", "load_average_at_end"} <= set(found["machine"])
    period = found["plan"]["period"]
    cases = found["cases"]
    streamed = [name for name, case in cases.items() if case["algorithm"].get("overlap", 0) > 0]
    # Local SGD and DiLoCo, each plain and with F = 2, τ = H/2; local SGD also F = 1, τ = H.
    expected = {"local_sgd", "diloco", f"local_sgd F=2 τ={period // 2}", f"local_sgd F=1 τ={period}"}
    assert expected <= set(cases)
    assert sorted(streamed) == sorted(
        [f"local_sgd F=2 τ={period // 2}", f"local_sgd F=1 τ={period}", f"diloco F=2 τ={period // 2}"]
    )
    reps = found["plan"]["repetitions"]
    by_name: dict[str, list[dict]] = {}
    for r in found["ratios"]:
        assert r["reps"] == reps and len(r["values"]) == reps
        by_name.setdefault(r["name"], []).append(r)
    hidden = by_name["hidden share of the network wait"]
    assert sorted(r["case"] for r in hidden) == sorted(streamed)
    assert all(r["target"] == 0.7 and r["target_is"] == ">=" for r in hidden)
    steps = by_name["measured / predicted s/step"]
    assert {r["case"] for r in steps} == set(cases)
    # A streamed or compressed case is held to the band from both sides; a plain one has no target.
    for name in cases:
        targets = sorted((r["target_is"], r["target"]) for r in steps if r["case"] == name)
        if name in ("local_sgd", "diloco"):
            assert targets == [(None, None)]
        else:
            assert targets == [("<=", 1.15), (">=", 0.85)]
    # Every measured window moved every sync it should: H/F-spaced fragments land
    # periods × F times, the plain case's syncs periods times.
    windows = found["plan"]["periods"]
    for name, reps_of in found["measurements"].items():
        fragments = cases[name]["algorithm"].get("fragments", 1)
        assert [m["collectives"] for m in reps_of] == [windows * fragments] * reps
        assert all(m["predicted_step_s"] > 0 and m["step_s"] > 0 for m in reps_of)
    # A codec's sync is an all-gather of its payload: scales included, int8 sends at most
    # 0.27x and 4-bit at most 0.15x of the plain case's fp32 bytes.
    coded = {
        name: case["algorithm"]["compression"]["codec"]
        for name, case in cases.items()
        if "compression" in case["algorithm"]
    }
    limits = {"int8": 0.27, "int4": 0.15}
    for name, codec in coded.items():
        plain = found["measurements"][name.split(" ")[0]][0]["bytes_per_collective"]
        sent = [m["bytes_per_collective"] for m in found["measurements"][name]]
        assert all(0 < b <= limits[codec] * plain for b in sent), (name, sent, plain)
        assert all(m["gathers"] == m["collectives"] for m in found["measurements"][name])
        for figure in ("codec work in the run / calibrated", "all-gather wait / predicted transfer"):
            assert [r["case"] for r in by_name[figure]].count(name) == 1
        encode, decode = found["codec_costs_s_per_value"][codec]
        assert encode >= 0 and decode >= 0 and encode + decode > 0
        # The prediction prices the codec's work: its per-value costs times the values counted.
        steps = found["plan"]["periods"] * found["plan"]["period"]
        for m in found["measurements"][name]:
            assert m["predicted_codec_s_per_sync"] > 0
            per_sync = m["predicted_transfer_s_per_sync"] + m["predicted_codec_s_per_sync"]
            assert m["predicted_wait_s"] * steps == pytest.approx(per_sync * m["collectives"])
    [table] = found["tables"]
    assert table["columns"][:2] == ["case", "ms/step"]
    assert [row[0] for row in table["rows"]] == list(cases)
    assert all(len(row) == len(table["columns"]) for row in table["rows"])
