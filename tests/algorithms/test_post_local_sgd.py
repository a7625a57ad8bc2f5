"""Post-local SGD: its period counts from the switch."""

from __future__ import annotations

from fakes import run_fake
from localsgd import algorithms as A


def test_post_local_counts_its_period_from_the_switch():
    per_step, stats, *_ = run_fake(A.PostLocalSGD(switch_step=5, period=4), 14)
    assert per_step[:5] == [["world"]] * 5  # gradients, every step
    assert per_step[5:] == [[], [], [], ["world"], [], [], [], ["world"], []]
    assert stats["syncs"] == 7
