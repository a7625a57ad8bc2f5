"""The ImageNet study files plan their runs here, without ImageNet, and estimate each on the
V100 cluster: the poster's trade-off (local SGD saves the communication that grows with K)
is visible before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from localsgd.studies.estimate import estimate_run
from localsgd.studies.loading import load_study

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "runs"), [("ortiz2021_imagenet", 50), ("goyal2017_imagenet", 12)])
def test_the_study_plans_and_estimates_every_run(name, runs, monkeypatch):
    monkeypatch.chdir(ROOT)  # the cluster file's path is relative to the checkout
    study = load_study(ROOT / "studies" / f"{name}.toml")
    assert len(study.runs) == runs
    section = study.section.estimate
    assert section is not None
    cluster = section.load_cluster()
    assert cluster.devices_per_node == 8
    estimates = {run.run_id(): estimate_run(run, section, cluster) for run in study.runs}
    assert all(e.comm_seconds is not None and e.compute_seconds > 0 for e in estimates.values())
    # 90 epochs of 1,153,050 training images (10 % held out) at 32 per worker.
    for run in study.runs:
        assert estimates[run.run_id()].steps == 90 * (1153050 // (32 * run.workers))


def test_ortiz_local_sgd_saves_what_minibatch_sgd_spends_across_nodes(monkeypatch):
    monkeypatch.chdir(ROOT)
    study = load_study(ROOT / "studies" / "ortiz2021_imagenet.toml")
    section = study.section.estimate
    cluster = section.load_cluster()

    def comm(workers: int, algorithm: dict) -> float:
        run = next(
            r
            for r in study.runs
            if r.workers == workers and r.algorithm == algorithm and r.workload_name == "imagenet_resnet50"
        )
        seconds = estimate_run(run, section, cluster).comm_seconds
        assert seconds is not None
        return seconds

    minibatch = {"name": "minibatch_sgd"}
    # Inside one node (K = 8) the all-reduce is NVLink's; from two nodes on, 10 Gb/s Ethernet's.
    assert comm(16, minibatch) > 10 * comm(8, minibatch)
    for workers in (16, 32, 64):
        h1 = comm(workers, {"name": "local_sgd", "period": 1})
        h16 = comm(workers, {"name": "local_sgd", "period": 16})
        assert h1 == pytest.approx(comm(workers, minibatch))
        assert h16 == pytest.approx(h1 / 16, rel=0.01)
