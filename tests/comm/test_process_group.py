"""Data flow on real gloo process groups at world sizes 2 and 4.

Each fixture spawns one world that runs many trainings; the tests assert on what came back.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import scenarios
from harness import run_world

WORLDS = [2, 4]
# One xdist worker runs this module, so its K = 2 and K = 4 worlds are built once per session, not once per worker.
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("process_group")]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=WORLDS, ids=lambda k: f"K{k}")
def equivalences(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, torch.Tensor]]]:
    return request.param, run_world(scenarios.equivalences, request.param)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda k: f"K{k}")
def consistency(request: pytest.FixtureRequest) -> tuple[int, list[dict[Any, Any]]]:
    return request.param, run_world(scenarios.consistency, request.param)


def test_minibatch_and_period_one_equal_one_process_on_the_concatenated_batch(equivalences):
    _, ranks = equivalences
    for r in ranks:
        assert rel_err(r["minibatch"], r["reference"]) <= 1e-6
        assert rel_err(r["local_h1"], r["reference"]) <= 1e-6
        assert rel_err(r["local_h1"], r["minibatch"]) <= 1e-6
    # Training moved the model: the equality is not that of an untouched init.
    assert rel_err(ranks[0]["reference"], scenarios.flat(scenarios.make_model())) > 1e-2


def test_post_local_is_minibatch_before_the_switch_and_local_after(equivalences):
    _, ranks = equivalences
    for r in ranks:
        assert torch.equal(r["post_local_at_switch"], r["minibatch_momentum_at_switch"])
        assert torch.equal(r["post_local_at_switch"], r["post_local_prefix"])
        assert rel_err(r["post_local"], r["minibatch_then_local"]) <= 1e-6


def test_outer_optimizers_without_momentum_equal_local_sgd(equivalences):
    _, ranks = equivalences
    for r in ranks:
        assert rel_err(r["slowmo_plain"], r["local_h4"]) <= 1e-6
        assert rel_err(r["diloco_plain"], r["local_h4"]) <= 1e-6


@pytest.mark.parametrize("name", ["slowmo", "diloco"])
def test_outer_optimizers_after_a_switch_are_minibatch_then_outer_steps_from_that_model(equivalences, name):
    _, ranks = equivalences
    for r in ranks:
        # Before t': exactly the parameters of mini-batch SGD.
        assert torch.equal(r[f"{name}_at_switch"], r["minibatch_momentum_at_switch"])
        # After: outer steps from the model at t' with zero momentum, not mini-batch SGD.
        assert rel_err(r[f"{name}_switched"], r[f"{name}_from_the_switched_model"]) <= 1e-6
        assert rel_err(r[f"{name}_switched"], r["minibatch_momentum"]) > 1e-4
        assert rel_err(r[f"{name}_switched"], r["post_local"]) > 1e-4  # the outer step acts
        # t' = 6 gradient rounds, then 14 local steps with H = 4: 3 syncs (counted inside
        # the with block, before the one on exit).
        assert int(r[f"{name}_switched_syncs"]) == int(r["post_local_syncs"]) == 6 + 3


def test_hierarchical_with_one_block_equals_local_sgd(equivalences):
    _, ranks = equivalences
    for r in ranks:
        assert rel_err(r["hier_one_block"], r["local_h2"]) <= 1e-6
        assert rel_err(r["local_h2"], r["local_h4"]) > 1e-4  # the periods do matter


def test_gradient_accumulation_equals_minibatch_on_the_joined_micro_batches(equivalences):
    _, ranks = equivalences
    for r in ranks:
        assert rel_err(r["accumulation"], r["minibatch_joined"]) <= 1e-6


# -- consistency: when replicas agree ---------------------------------------------------------


def expected_identical(name: str, step: int) -> bool:
    """Whether every replica holds the same parameters after 1-based step ``step``."""
    return {
        "minibatch_sgd": True,
        "gradient_accumulation": True,
        "local_sgd": step % 4 == 0,
        "post_local_sgd": step <= 4 or (step - 4) % 3 == 0,
        "hierarchical_local_sgd": step % 4 == 0,
        "slowmo": step % 4 == 0,
        "diloco": step % 4 == 0,
        "sma": False,
        "slowmo_switched": step <= 4 or (step - 4) % 3 == 0,
        "diloco_switched": step <= 4 or (step - 4) % 3 == 0,
    }[name]


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "fp32+fp64"])
@pytest.mark.parametrize("name", list(scenarios.consistency_configs(2)))
def test_replicas_identical_exactly_after_syncs(consistency, name, mixed):
    world, ranks = consistency
    steps = ranks[0][(name, mixed)]["steps"]
    for i, entry in enumerate(steps, start=1):
        same = all(entry["equal"])
        want = expected_identical(name, i)
        if name == "hierarchical_local_sgd" and world == 2:
            want = i % 2 == 0  # one block of 2 is the whole world
        assert same == want, f"{name} step {i}: identical={same}, expected {want}"
        if name == "hierarchical_local_sgd" and i % 2 == 0:
            assert all(entry["equal_pairs"]), f"block replicas differ after block sync {i}"
        if name == "sma":
            assert all(entry["central_equal"]), f"SMA central models differ at step {i}"
    assert ranks[0][(name, mixed)]["final_equal"], f"{name}: replicas differ after exit"


def expected_sync_scopes(name: str, step: int, world: int) -> list[str]:
    """The scopes averaged at 1-based step ``step`` (gradients or parameters)."""
    if name in ("minibatch_sgd", "sma"):
        return ["world"]
    if name == "gradient_accumulation":
        return ["world"] if step % 3 == 0 else []
    if name in ("post_local_sgd", "slowmo_switched", "diloco_switched"):
        return ["world"] if step <= 4 or (step - 4) % 3 == 0 else []
    if name == "hierarchical_local_sgd":
        if step % 4 == 0:
            return ["world"]
        return ["block2"] if step % 2 == 0 else []
    return ["world"] if step % 4 == 0 else []


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "fp32+fp64"])
@pytest.mark.parametrize("name", list(scenarios.consistency_configs(2)))
def test_one_collective_per_dtype_and_four_bytes_per_parameter(consistency, name, mixed):
    world, ranks = consistency
    result = ranks[0][(name, mixed)]
    numel = result["numel"]
    assert sum(numel.values()) > 0
    n_tensors = 2 * 11 + (2 if mixed else 0)
    assert n_tensors >= 20
    dtypes = len(numel)
    payload = sum(n * (4 if "32" in dt else 8) for dt, n in numel.items())
    prev = {"collectives": 0, "bytes": 0, "syncs": 0}
    prev_scope: dict[str, dict[str, float]] = {}
    for i, entry in enumerate(result["steps"], start=1):
        scopes = expected_sync_scopes(name, i, world)
        stats = entry["stats"]
        d_coll = stats["collectives"] - prev["collectives"]
        d_bytes = stats["bytes"] - prev["bytes"]
        assert d_coll == dtypes * len(scopes), f"{name} step {i}: {d_coll} collectives"
        assert entry["real_all_reduce"] == d_coll, f"{name} step {i}: counter disagrees with gloo"
        assert d_bytes == payload * len(scopes), f"{name} step {i}: {d_bytes} bytes"
        assert stats["syncs"] - prev["syncs"] == len(scopes)
        for scope in scopes:
            before = prev_scope.get(scope, {"bytes": 0})["bytes"]
            assert entry["by_scope"][scope]["bytes"] - before == payload
        prev = stats
        prev_scope = entry["by_scope"]
    if not mixed:
        assert set(numel) == {"torch.float32"}
        assert payload == 4 * numel["torch.float32"]


# -- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS, ids=lambda k: f"K{k}")
def test_resumed_run_continues_exactly(world, tmp_path):
    first = run_world(scenarios.resume_first, world, str(tmp_path))
    second = run_world(scenarios.resume_second, world, str(tmp_path))
    names = list(scenarios.resume_configs(world))
    assert sorted(first[0]) == sorted(names)
    for rank in range(world):
        for name in names:
            a, b = first[rank][name], second[rank][name]
            assert torch.equal(a["params"], b["params"]), f"{name} rank {rank} diverged after resume"
            for key in ("steps", "syncs", "collectives", "bytes"):
                assert a["stats"][key] == b["stats"][key], f"{name} {key}"
    # Saved mid-run: the checkpoint was not taken at a point where resuming is trivial.
    assert not torch.equal(first[0]["local_sgd"]["params"], first[0]["sma"]["params"])


def test_batchnorm_statistics_are_averaged_at_syncs_and_on_exit():
    ranks = run_world(scenarios.batchnorm_buffers, 2)
    equal = [entry["equal"] for entry in ranks[0]]
    # Steps 1..7 (synced at 3 and 6), then after exit.
    assert equal == [False, False, True, False, False, True, False, True]


def test_amp_overflow_on_one_rank_skips_the_step_on_every_rank():
    ranks = run_world(scenarios.amp_overflow_agreement, 2)
    for r in ranks:
        assert r["steps_taken"] == [1, 1, 0, 1]
        assert r["stats"]["syncs"] == 3
    assert ranks[0]["scale"] == ranks[1]["scale"] == 2.0**7  # backed off once, on both
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert torch.isfinite(ranks[0]["params"]).all()
