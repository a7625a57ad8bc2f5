"""The report's "measured against estimated" section: worker-process runs beside the cost
model's estimate for the report's cluster, injected delay included, by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from localsgd.costmodel import Cluster, Link, cluster_to_toml, comm_seconds
from localsgd.records import EngineInfo, Store
from localsgd.report import make_report
from report.records import write_run

CLUSTER = Cluster(
    "emulated-2x2", 2, inter=Link(4e-4, 1.1e7), intra=Link(3e-4, 4e8), allreduce="ring", description="test"
)
PAYLOAD = 32_424  # bytes per average


def config(workers: int, seed: int, delay: dict[str, float]) -> dict[str, Any]:
    return {
        "name": "run",
        "workload": {"name": "mnist1d_cnn"},
        "workers": workers,
        "seed": seed,
        "algorithm": {"name": "hierarchical_local_sgd", "period": 4, "block_period": 4, "block_size": 2},
        "data": {"batch_size": 32},
        "optimizer": {"lr": 0.1},
        "comm": {"delay": delay},
    }


def scopes(world: int, block: int, seconds: float) -> dict[str, dict[str, float]]:
    return {
        "world": {"collectives": world, "bytes": world * PAYLOAD, "seconds": seconds * 0.75},
        "block2": {"collectives": block, "bytes": block * PAYLOAD, "seconds": seconds * 0.25},
    }


# (seed, delay, wall seconds, comm seconds) of the K = 4 runs; 64 steps each: 4 global and
# 12 block averages.
RUNS = [(0, {}, 3.0, 0.5), (1, {}, 3.4, 0.7), (0, {"world": 0.25}, 4.2, 1.6), (1, {"world": 0.25}, 4.0, 1.5)]


def half_unit(cell: str) -> float:
    """Half a unit of the last digit shown of the mean in ``cell`` (``2.61 ± 0.14``: 0.005)."""
    mean = cell.split(" ± ")[0]
    places = len(mean.split(".")[1]) if "." in mean else 0
    return 0.5 * 10.0**-places


def build(root: Path) -> Store:
    store = Store(root)
    for seed, delay, wall, comm in RUNS:
        by_scope = scopes(4, 12, comm)
        row = {
            "step": 64,
            "epoch": 1.0,
            "samples": 64 * 128,
            "wall_seconds": wall,
            "test_accuracy": 0.9,
            "test_loss": 0.3,
            "bytes": 16 * PAYLOAD,
            "syncs": 16,
            "collectives": 16,
            "comm_seconds": comm,
            "by_scope": by_scope,
        }
        counters = {"steps": 64, "syncs": 16, "collectives": 16, "bytes": 16 * PAYLOAD, "comm_seconds": comm}
        write_run(store, f"k4s{seed}{len(delay)}", config(4, seed, delay), [row], "completed",
                  counters={**counters, "by_scope": by_scope})  # fmt: skip
    # A simulated run is not a measured K-worker time: it stays out of the section.
    sim = dict(row, wall_seconds=0.5)
    write_run(store, "sim", {**config(4, 0, {}), "engine": "simulated"}, [sim], "completed",
              counters={**counters, "by_scope": by_scope}, engine=EngineInfo("simulated", real_wall_time=False))  # fmt: skip
    return store


def test_measured_beside_estimated_with_the_delay(tmp_path: Path) -> None:
    build(tmp_path / "store")
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_to_toml(CLUSTER))
    paths = make_report(tmp_path / "store", cluster=path, formats="png")
    assert paths["measured_vs_estimated.png"].stat().st_size > 10_000
    text = paths["markdown"].read_text()
    section = text.split("## Measured against estimated on emulated-2x2")[1].split("## Run status")[0]
    assert "![Measured against estimated training time on emulated-2x2](measured_vs_estimated.png)" in section
    lines = [line for line in section.splitlines() if line.startswith("| mnist1d_cnn")]
    assert len(lines) == 2  # one per delay setting; the simulated run is left out
    for delay, runs in (({}, RUNS[:2]), ({"world": 0.25}, RUNS[2:])):
        # Estimate = measured compute (wall − comm) + the model's communication + delay × 4.
        network = comm_seconds(scopes(4, 12, 0.0), 4, CLUSTER)
        expected = [wall - comm + network + 4 * delay.get("world", 0.0) for _, _, wall, comm in runs]
        ratios = [wall / e for (_, _, wall, _), e in zip(runs, expected)]
        mean = sum(expected) / 2
        line = next(x for x in lines if ("delay.world=0.25" in x) == bool(delay))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == "2"
        # Rounded by the report's rule: to the last digit its std keeps.
        assert float(cells[4].split(" ± ")[0]) == pytest.approx(mean, abs=half_unit(cells[4]))
        assert float(cells[5].split(" ± ")[0]) == pytest.approx(sum(ratios) / 2, abs=half_unit(cells[5]))
        assert float(cells[7]) == pytest.approx(network + 4 * delay.get("world", 0.0), rel=5e-3)
    # The estimate section describes the flat ring and the delay it adds.
    assert "one flat ring over all ranks across nodes, as gloo runs it" in text
    assert "injected delay (comm.delay)" in text


def test_no_section_without_measured_multi_worker_runs(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    row = {
        "step": 8,
        "epoch": 1.0,
        "samples": 256,
        "wall_seconds": 1.0,
        "test_accuracy": 0.5,
        "test_loss": 1.0,
    }
    write_run(store, "one", config(1, 0, {}) | {"algorithm": {"name": "minibatch_sgd"}}, [row], "completed")
    paths = make_report(tmp_path / "store", cluster="10gbe", formats="png")
    assert not any(k.startswith("measured_vs_estimated") for k in paths)
    assert "Measured against estimated" not in paths["markdown"].read_text()
