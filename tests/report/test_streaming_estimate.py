"""``localsgd report --cluster`` reads a streamed run's overlap τ from its config: its world
averages hide τ steps of compute each."""

from __future__ import annotations

import math

import pytest

from localsgd.costmodel import Cluster, Link, comm_seconds
from localsgd.report.estimates import _estimate, streamed_overlap


def test_a_runs_overlap_is_read_from_its_flattened_config():
    assert streamed_overlap({"config.algorithm.overlap": 2}) == {"world": 2}
    assert streamed_overlap({"config.algorithm.overlap": 0}) == {}
    assert streamed_overlap({"config.algorithm.overlap": math.nan}) == {}
    assert streamed_overlap({}) == {}


def test_the_report_estimate_of_a_streamed_run_hides_tau_steps_per_world_collective():
    cluster = Cluster("slow", 1, inter=Link(1e-3, 1.25e7), intra=Link(1e-5, 2e9), allreduce="ring")
    counters = {"world": {"collectives": 10, "bytes": 10 * 5e5}}
    per_step = 0.02
    compute, comm, total = _estimate(counters, 40, 4, 32, cluster, per_step, {}, {"world": 3})
    plain = comm_seconds(counters, 4, cluster)
    each = plain / 10
    assert comm == pytest.approx(10 * max(0.0, each - 3 * per_step), rel=1e-12)
    assert 0 < comm < plain
    assert total == pytest.approx(compute + comm)
