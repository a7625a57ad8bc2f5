"""``planned_syncs``, what the cost model reads before a run, equals the synchronisations
per scope a run of every registered algorithm takes, counted on a fake world of 4."""

from __future__ import annotations

import pytest

from fakes import run_fake
from localsgd import algorithms

STEPS = 37

CONFIGS = [
    {"name": "minibatch_sgd"},
    {"name": "local_sgd", "period": 4},
    {"name": "local_sgd", "period": 5},
    {"name": "post_local_sgd", "switch_step": 10, "period": 4},
    {"name": "post_local_sgd", "switch_step": 0, "period": 6},
    {"name": "post_local_sgd", "switch_step": 50, "period": 6},
    {"name": "hierarchical_local_sgd", "period": 2, "block_period": 3, "block_size": 2},
    {"name": "slowmo", "period": 4},
    {"name": "slowmo", "period": 4, "switch_step": 9},
    {"name": "diloco", "period": 6},
    {"name": "diloco", "period": 3, "switch_step": 7},
    {"name": "gradient_accumulation", "steps": 3},
    # Streamed: each fragment's sync counted at the step it lands.
    {"name": "local_sgd", "period": 4, "fragments": 2, "overlap": 1},
    {"name": "local_sgd", "period": 6, "fragments": 3, "overlap": 2, "mixing": 0.5},
    {"name": "post_local_sgd", "switch_step": 10, "period": 4, "fragments": 4, "overlap": 1},
    {"name": "hierarchical_local_sgd", "period": 2, "block_period": 3, "block_size": 2, "fragments": 3, "overlap": 1},
    {"name": "slowmo", "period": 4, "switch_step": 9, "fragments": 2, "overlap": 2},
    {"name": "diloco", "period": 6, "fragments": 2, "overlap": 3, "mixing": 0.25},
    {"name": "sma"},
]


def counted(per_step: list[list[str]]) -> dict[str, int]:
    """Steps at which each scope was averaged at least once (one sync may average the
    parameters and the buffers in two calls)."""
    counts: dict[str, int] = {}
    for scopes in per_step:
        for scope in set(scopes):
            counts[scope] = counts.get(scope, 0) + 1
    return counts


@pytest.mark.parametrize("spec", CONFIGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_planned_syncs_count_the_runs_syncs(spec):
    algo = algorithms.build(spec)
    per_step, stats, *_ = run_fake(algo, STEPS)
    planned = {scope: n for scope, n in (algo.planned_syncs(STEPS) or {}).items() if n}
    assert planned == counted(per_step)
    assert sum(planned.values()) == stats["syncs"]


def test_every_synchronous_algorithm_is_covered():
    names = {spec["name"] for spec in CONFIGS}
    synchronous = {n for n in algorithms.names() if not algorithms.get(n).asynchronous}
    assert synchronous <= names, f"add these to CONFIGS: {sorted(synchronous - names)}"


def test_an_asynchronous_schedule_is_not_planned():
    for name in algorithms.names():
        if algorithms.get(name).asynchronous:
            assert algorithms.build({"name": name}).planned_syncs(100) is None
