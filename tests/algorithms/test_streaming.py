"""Streaming synchronization (fragments F, overlap τ, mixing α): F = 1, τ = 0, α = 0 through
the streaming machinery is each algorithm bit for bit, on real gloo groups and in the
simulated engine; a streamed run follows the formula of Streaming DiLoCo; a checkpoint
taken while an average is in flight resumes exactly."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import localsgd
from harness import run_world
from localsgd import algorithms as A
from localsgd.algorithms.streaming import (
    StreamingOptions,
    fragment_offsets,
    split_fragments,
    streamed_syncs,
)
from localsgd.engines.simulated.engine import ReplicaGradients, SimulatedCommunicator, StackedModel
from localsgd.util.checks import ConfigError
from scenarios import batch, flat, loss_step, make_model, sgd

# One xdist worker runs this module, so its gloo world is built once per session, not once per worker.
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("streaming_gloo")]

STEPS = 14
CONSENSUS_AT = 10

# Several periods in STEPS steps, each ending between syncs. Hierarchical local SGD's blocks
# of one worker (a world of 2) leave its global level the only one that moves bits.
PERIODIC = {
    "local_sgd": {"name": "local_sgd", "period": 3},
    "post_local_sgd": {"name": "post_local_sgd", "switch_step": 2, "period": 3},
    "hierarchical_local_sgd": {"name": "hierarchical_local_sgd", "period": 1, "block_period": 3, "block_size": 1},
    "slowmo": {"name": "slowmo", "period": 3, "outer_momentum": 0.5, "switch_step": 1},
    "diloco": {"name": "diloco", "period": 4, "outer_lr": 0.7, "outer_momentum": 0.9},
}


@contextlib.contextmanager
def forced_streaming() -> Iterator[None]:
    """Route F = 1, τ = 0, α = 0 through the streaming synchronizer (by default it takes the
    algorithm's own path)."""
    saved = StreamingOptions.active
    StreamingOptions.active = property(lambda self: True)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        StreamingOptions.active = saved  # type: ignore[method-assign]


def _run(algo: A.AlgorithmConfig, rank: int, momentum: float = 0.9) -> dict[str, Any]:
    model = make_model()
    opt = sgd(model, momentum)
    with localsgd.DataParallel(model, opt, algo) as dp:
        for step in range(STEPS):
            loss_step(model, opt, *batch(rank, step))
            if step + 1 == CONSENSUS_AT:
                mid = flat(model)
                with dp.consensus():
                    consensus = flat(model)
        stats = dict(dp.stats)
    return {"mid": mid, "consensus": consensus, "final": flat(model), "stats": stats}


def identity_world(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for name, spec in PERIODIC.items():
        algo = A.build(spec)
        today = _run(algo, rank)
        with forced_streaming():
            streamed = _run(algo, rank)
        out[name] = (today, streamed)
    return out


def _same(today: dict[str, Any], streamed: dict[str, Any], name: str) -> None:
    for key in ("mid", "consensus", "final"):
        assert torch.equal(today[key], streamed[key]), f"{name} {key}"
    for key in ("syncs", "collectives", "bytes"):
        assert today["stats"][key] == streamed["stats"][key], f"{name} {key}"
    assert {k: (v["collectives"], v["bytes"]) for k, v in today["stats"]["by_scope"].items()} == {
        k: (v["collectives"], v["bytes"]) for k, v in streamed["stats"]["by_scope"].items()
    }


def gloo_world(rank: int, world: int, folder: str) -> dict[str, Any]:
    """Every gloo check of this file in one world (a world's start is the slow part)."""
    return {
        "identity": identity_world(rank, world),
        "streamed": streamed_world(rank, world),
        "whole_period": whole_period_world(rank, world),
        "resume": resume_world(rank, world, folder),
    }


@pytest.fixture(scope="module")
def gloo(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_world(gloo_world, 2, str(tmp_path_factory.mktemp("streaming")))


def test_one_fragment_without_overlap_or_mixing_is_each_algorithm_bit_for_bit_on_gloo(gloo):
    ranks = [r["identity"] for r in gloo]
    for rank in ranks:
        for name, (today, streamed) in rank.items():
            _same(today, streamed, name)
            assert today["stats"]["syncs"] > 2, name
    # The replicas moved apart between syncs: the equality is not that of identical replicas.
    assert not torch.equal(ranks[0]["local_sgd"][0]["mid"], ranks[1]["local_sgd"][0]["mid"])


# -- the simulated engine ----------------------------------------------------------------------

K = 4


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def xent(model: nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(data["x"]), data["y"])


def stacked_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"x": torch.randn(K, 8, 3, generator=g), "y": torch.randint(0, 2, (K, 8), generator=g)}


def run_simulated(
    algo: A.AlgorithmConfig, steps: int = STEPS, *, save_at: int | None = None, resume: dict[str, Any] | None = None
) -> dict[str, Any]:
    stacked = StackedModel(bn_model(), K)
    opt = torch.optim.SGD(stacked.parameters(), lr=0.1, momentum=0.9)
    grads = ReplicaGradients(stacked, xent)
    comm = SimulatedCommunicator(K)
    saved = None
    first = 0
    with localsgd.DataParallel(stacked, opt, algo, comm=comm, flat=False) as dp:
        if resume is not None:
            stacked.load_state_dict(resume["model"])
            opt.load_state_dict(resume["opt"])
            dp.load_state_dict(resume["dp"])
            first = resume["step"]
        for step in range(first, steps):
            opt.zero_grad()
            grads(stacked_batch(step))
            opt.step()
            if step + 1 == save_at:
                saved = {
                    "model": {k: v.clone() for k, v in stacked.state_dict().items()},
                    "opt": copy.deepcopy(opt.state_dict()),
                    "dp": copy.deepcopy(dp.state_dict()),
                    "step": step + 1,
                }
            if step + 1 == CONSENSUS_AT:
                with dp.consensus():
                    consensus = [t.clone() for t in stacked.state_dict().values()]
        stats = dict(dp.stats)
    return {
        "final": [t.clone() for t in stacked.state_dict().values()],
        "consensus": consensus if resume is None else None,
        "stats": stats,
        "saved": saved,
    }


SIMULATED = {**PERIODIC, "hierarchical_local_sgd": {**PERIODIC["hierarchical_local_sgd"], "block_size": 2}}


@pytest.mark.parametrize("name", list(SIMULATED))
def test_one_fragment_without_overlap_or_mixing_is_each_algorithm_bit_for_bit_simulated(name):
    algo = A.build(SIMULATED[name])
    today = run_simulated(algo)
    with forced_streaming():
        streamed = run_simulated(algo)
    for key in ("final", "consensus"):
        for a, b in zip(today[key], streamed[key]):
            assert torch.equal(a, b), f"{name} {key}"
    for key in ("syncs", "collectives", "bytes"):
        assert today["stats"][key] == streamed["stats"][key], key
    assert today["stats"]["by_scope"].keys() == streamed["stats"]["by_scope"].keys()


STREAMED = {
    "local_sgd": {"name": "local_sgd", "period": 4, "fragments": 2, "overlap": 2, "mixing": 0.5},
    "diloco": {"name": "diloco", "period": 4, "fragments": 2, "overlap": 2, "mixing": 0.5},
    "hierarchical_local_sgd": {
        "name": "hierarchical_local_sgd",
        "period": 2,
        "block_period": 2,
        "block_size": 2,
        "fragments": 2,
        "overlap": 1,
    },
    "post_local_sgd": {"name": "post_local_sgd", "switch_step": 3, "period": 4, "fragments": 4, "overlap": 1},
    "slowmo": {"name": "slowmo", "period": 4, "fragments": 2, "overlap": 2, "outer_momentum": 0.5, "mixing": 0.25},
}


@pytest.mark.parametrize("name", list(STREAMED))
def test_a_checkpoint_taken_with_an_average_in_flight_resumes_exactly(name):
    algo = A.build(STREAMED[name])
    # At step 5 fragment 0 (started at 4) is in flight for τ = 2 (1 for the others).
    whole = run_simulated(algo, save_at=5)
    resumed = run_simulated(algo, resume=whole["saved"])
    assert whole["saved"]["dp"]["algorithm"] is not None
    for a, b in zip(whole["final"], resumed["final"]):
        assert torch.equal(a, b)
    for key in ("syncs", "collectives", "bytes"):
        assert whole["stats"][key] == resumed["stats"][key], key


def resume_world(rank: int, world: int, folder: str) -> dict[str, Any]:
    """DiLoCo streamed, checkpointed at step 5 with fragment 0's average in flight, then
    resumed from that checkpoint into a model of another init."""
    algo = A.build(STREAMED["diloco"])
    path = Path(folder) / f"rank{rank}.pt"
    model = make_model()
    opt = sgd(model, 0.9)
    with localsgd.DataParallel(model, opt, algo) as dp:
        for step in range(STEPS):
            loss_step(model, opt, *batch(rank, step))
            if step + 1 == 5:
                torch.save({"dp": dp.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, path)
    whole = {"params": flat(model), "stats": dict(dp.stats)}
    ckpt = torch.load(path, weights_only=False)
    model = make_model(seed=123)
    model.load_state_dict(ckpt["model"])
    opt = sgd(model, 0.9)
    opt.load_state_dict(ckpt["opt"])
    with localsgd.DataParallel(model, opt, algo) as dp:
        dp.load_state_dict(ckpt["dp"])
        for step in range(5, STEPS):
            loss_step(model, opt, *batch(rank, step))
    return {"whole": whole, "resumed": {"params": flat(model), "stats": dict(dp.stats)}, "ckpt": ckpt["dp"]}


def test_a_checkpoint_with_an_average_in_flight_resumes_exactly_on_gloo(gloo):
    for r in (g["resume"] for g in gloo):
        assert [f["lands"] for f in r["ckpt"]["algorithm"]["in_flight"]] == [6]
        assert torch.equal(r["whole"]["params"], r["resumed"]["params"])
        for key in ("syncs", "collectives", "bytes"):
            assert r["whole"]["stats"][key] == r["resumed"]["stats"][key], key


def test_a_saved_state_holds_the_average_in_flight():
    algo = A.build(STREAMED["local_sgd"])
    state = run_simulated(algo, save_at=5)["saved"]["dp"]["algorithm"]
    assert [(f["fragment"], f["started"], f["lands"]) for f in state["in_flight"]] == [(0, 4, 6)]
    assert state["step"] == 5


# -- the formula --------------------------------------------------------------------------------


def streamed_reference(period: int, fragments: int, overlap: int, mixing: float, steps: int) -> list[torch.Tensor]:
    """Local SGD streamed by hand on K separate models: fragment p's average of the models
    at t, landing at t + τ as (1 − α)·average + α·local; what lands at the step its own
    fragment starts again (F = 1, τ = H) lands after that start."""
    models = [make_model() for _ in range(2)]
    opts = [sgd(m) for m in models]
    params = [list(m.parameters()) for m in models]
    groups = split_fragments([p.numel() for p in params[0]], fragments)
    offsets = fragment_offsets(period, fragments)
    flying: list[tuple[int, int, list[torch.Tensor]]] = []
    for step in range(1, steps + 1):
        for k, (m, o) in enumerate(zip(models, opts)):
            loss_step(m, o, *batch(k, step - 1))

        starting = [p for p, offset in enumerate(offsets) if (step - offset) % period == 0]

        def land(step: int, keep: tuple[int, ...] = ()) -> None:
            while flying and flying[0][0] == step and flying[0][1] not in keep:
                _, p, mean = flying.pop(0)
                with torch.no_grad():
                    for k in range(2):
                        for i, avg in zip(groups[p], mean):
                            params[k][i].copy_((1 - mixing) * avg + mixing * params[k][i])

        land(step, tuple(starting))
        for p in starting:
            mean = [(params[0][i].detach() + params[1][i].detach()) / 2 for i in groups[p]]
            flying.append((step + overlap, p, mean))
        land(step)
    return [flat(m) for m in models]


def streamed_world(rank: int, world: int, algo: A.AlgorithmConfig | None = None) -> dict[str, Any]:
    algo = algo or A.LocalSGD(period=4, fragments=2, overlap=1, mixing=0.5)
    model = make_model()
    opt = sgd(model)
    dp = localsgd.DataParallel(model, opt, algo)
    with dp:
        for step in range(11):
            loss_step(model, opt, *batch(rank, step))
        before_exit = flat(model)
    return {"before_exit": before_exit, "final": flat(model), "stats": dict(dp.stats)}


def whole_period_world(rank: int, world: int) -> dict[str, Any]:
    return streamed_world(rank, world, A.LocalSGD(period=4, overlap=4))


def test_streamed_local_sgd_follows_the_formula_and_counts_each_fragment(gloo):
    ranks = [g["streamed"] for g in gloo]
    reference = streamed_reference(4, 2, 1, 0.5, 11)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["before_exit"], reference[rank], rtol=1e-6, atol=1e-7)
        # Fragment 1 starts at 2, 6, 10 and fragment 0 at 4, 8, each landing one step later;
        # mixed, neither is identical everywhere at the end, so each syncs once more on exit.
        assert r["stats"]["syncs"] == streamed_syncs(11, 4, StreamingOptions(2, 1, 0.5)) + 2 == 7
        assert r["stats"]["collectives"] == 7
    assert not torch.equal(ranks[0]["before_exit"], ranks[1]["before_exit"])  # mixed: replicas differ
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])  # the exit sync lands unmixed
    sizes = [p.numel() for p in make_model().parameters()]
    first, second = (4 * sum(sizes[i] for i in g) for g in split_fragments(sizes, 2))
    assert ranks[0]["stats"]["bytes"] == 3 * first + 4 * second


def test_one_fragment_in_flight_a_whole_period_averages_each_periods_progress(gloo):
    """F = 1, τ = H, α = 0: the average started at step 8 is of the models before the one
    started at 4 lands (landing first would average the landed model itself: no progress
    ever averaged, the model frozen at the first average)."""
    ranks = [g["whole_period"] for g in gloo]
    reference = streamed_reference(4, 1, 4, 0.0, 11)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["before_exit"], reference[rank], rtol=1e-6, atol=1e-7)
        assert r["stats"]["syncs"] == streamed_syncs(11, 4, StreamingOptions(1, 4, 0.0)) + 1 == 2
    frozen = streamed_reference(4, 1, 0, 0.0, 4)[0]  # the models' average at step 4
    assert not torch.allclose(ranks[0]["final"], frozen, atol=1e-3)
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])


# -- configuration -------------------------------------------------------------------------------


def test_fragments_are_contiguous_nonempty_and_balanced_by_elements():
    sizes = [10, 10, 10, 10, 40, 5, 5, 10]
    groups = split_fragments(sizes, 3)
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    assert [sum(sizes[i] for i in g) for g in groups] == [30, 50, 20]
    assert split_fragments([1, 1], 2) == [[0], [1]]
    with pytest.raises(ValueError, match="fragments = 3 exceeds the model's 2 trainable parameter tensors"):
        split_fragments([5, 5], 3)


def test_more_fragments_than_parameter_tensors_is_refused_naming_the_key():
    model = nn.Linear(3, 2)  # two parameter tensors
    algo = A.LocalSGD(period=4, fragments=4)
    with pytest.raises(ValueError, match=r"local_sgd.fragments = 4 exceeds the model's 2 trainable parameter tensors"):
        with localsgd.DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), algo):
            pass


def test_planned_streamed_syncs_count_each_fragment_as_it_lands():
    assert streamed_syncs(12, 4, StreamingOptions()) == 3
    assert streamed_syncs(12, 4, StreamingOptions(2, 0, 0.0)) == 6  # at 2, 4, 6, 8, 10, 12
    assert streamed_syncs(12, 4, StreamingOptions(2, 2, 0.0)) == 5  # the one started at 12 lands later
    assert streamed_syncs(1, 4, StreamingOptions(2, 1, 0.0)) == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "local_sgd", "period": 6, "fragments": 4}, r"local_sgd.fragments = 4 must divide local_sgd.period = 6"),
        ({"name": "diloco", "period": 8, "fragments": 2, "overlap": 5}, r"diloco.overlap = 5 must be <= diloco.period/fragments = 4"),
        ({"name": "slowmo", "mixing": 1.0}, r"slowmo.mixing must be a finite number >= 0 and < 1"),
        ({"name": "post_local_sgd", "fragments": 0}, r"post_local_sgd.fragments must be an integer >= 1"),
        ({"name": "local_sgd", "overlap": -1}, r"local_sgd.overlap must be an integer >= 0"),
        (
            {"name": "hierarchical_local_sgd", "period": 2, "block_period": 3, "fragments": 4},
            r"hierarchical_local_sgd.fragments = 4 must divide hierarchical_local_sgd.period·block_period = 6",
        ),
        (
            {"name": "local_sgd", "overlap": 1, "optimizer_state": "average"},
            r"local_sgd.optimizer_state = 'average' is not streamed",
        ),
    ],
)
def test_bad_streaming_fields_get_one_line_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        A.build(spec)


def test_the_fields_round_trip_and_default_to_no_streaming():
    for name in PERIODIC:
        config = A.build({"name": name})
        assert (config.fragments, config.overlap, config.mixing) == (1, 0, 0.0)  # type: ignore[attr-defined]
        spec = {**PERIODIC[name], "fragments": 1, "overlap": 1, "mixing": 0.5}
        built = A.build(spec)
        assert A.build(built.to_dict()) == built
        assert dataclasses.asdict(built)["mixing"] == 0.5
        assert "overlap=1" in built.label()


def test_a_streamed_config_keeps_its_period_field_for_the_hk_view():
    from localsgd.report.labels import period_fields

    assert period_fields(A.build(STREAMED["local_sgd"])) == ["period"]
    assert period_fields(A.build(STREAMED["hierarchical_local_sgd"])) == ["period"]
