"""The validation split of every text workload: held out of the training examples (no rank
trains on them), seeded by the data alone, evaluated the way the test split is, and
configured by ``workload.validation_fraction``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from localsgd import workloads
from localsgd.util.checks import ConfigError
from localsgd.workloads.base import shard_indices, validation_split
from textdata import text_spec

pytest.importorskip("transformers")

NAMES = ("mnli", "squad", "mlm", "classification")


@pytest.fixture(scope="module")
def built(text_fixtures: dict[str, Path]) -> dict[str, Any]:
    return {name: workloads.build(text_spec(text_fixtures, name)) for name in NAMES}


def examples_trained(wl: Any, rank: int, world: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Per batch of one epoch, the training examples it holds as indices into the tensors
    the cache holds (before the split): rows, or for SQuAD the question of each window."""
    n = len(wl.data["train"]["input_ids"])
    if wl.name == "squad":
        example_of = wl.data["train_example"].long()
        _, held = validation_split(len(wl.data["train_examples"]), wl.options.validation_fraction)
        keep = (~torch.isin(example_of, held)).nonzero().flatten()  # the windows trained on
    else:
        keep, _ = validation_split(n, wl.options.validation_fraction)
    steps = wl.steps_per_epoch(world, batch)
    shard = shard_indices(wl.train_size, rank, world, 0, seed)[: steps * batch]
    original = keep[shard].split(batch)
    for rows, got in zip(original, wl.train_batches(rank, world, batch, 0, seed, "cpu"), strict=True):
        ids = got["input_ids"]
        if "labels" in got and got["labels"].shape == ids.shape:  # masked LM: undo the masks
            ids = torch.where(got["labels"] == -100, ids, got["labels"])
        cached = wl.data["train"]["input_ids"][rows].long()
        assert torch.equal(ids, cached[:, : ids.shape[1]])
    if wl.name == "squad":
        return [wl.data["train_example"][rows].long() for rows in original]
    return list(original)


@pytest.mark.parametrize("name", NAMES)
def test_no_rank_trains_on_a_held_out_example(built, name):
    wl = built[name]
    held_count = len(wl.data["train_examples"]) if name == "squad" else len(wl.data["train"]["input_ids"])
    _, held = validation_split(held_count, 0.1)
    assert wl.validation_size == len(held) == round(0.1 * held_count) > 0
    seen = torch.cat([torch.cat(examples_trained(wl, r, 2, 8, seed=3)) for r in range(2)])
    assert not torch.isin(seen, held).any()
    assert len(seen) > 0.8 * wl.train_size  # every rank's full batches: nearly all of them


@pytest.mark.parametrize("name", NAMES)
def test_validation_is_scored_like_test_and_deterministic(text_fixtures, built, name):
    wl = built[name]
    model = wl.make_model(0)
    test = wl.evaluate(model, "cpu")
    validation = wl.evaluate(model, "cpu", split="validation")
    assert set(validation) == set(test) == {m.name for m in wl.metrics}
    assert validation != test
    assert wl.evaluate(model, "cpu", split="validation") == validation
    again = workloads.build(text_spec(text_fixtures, name))  # the split depends on the data alone
    assert again.validation_size == wl.validation_size
    assert again.evaluate(model, "cpu", split="validation") == validation
    with pytest.raises(ValueError, match=r"split must be one of \['validation', 'test'\], got 'train'"):
        wl.evaluate(model, "cpu", split="train")


def test_squad_validation_windows_are_those_of_the_cache(built):
    """The held-out questions are tokenised again for their offsets: the same windows."""
    wl = built["squad"]
    _, held = validation_split(len(wl.data["train_examples"]), 0.1)
    windows = torch.isin(wl.data["train_example"].long(), held)
    assert torch.equal(wl.held_out["eval"]["input_ids"], wl.data["train"]["input_ids"][windows])
    assert len(wl.held_out["answers"]) == wl.validation_size == len(held)
    assert wl.train_size == int((~windows).sum())


@pytest.mark.parametrize("name", NAMES)
def test_validation_fraction_zero_holds_nothing_out(text_fixtures, built, name):
    wl = workloads.build({**text_spec(text_fixtures, name), "validation_fraction": 0})
    assert wl.validation_size == 0
    assert wl.train_size == len(wl.data["train"]["input_ids"]) > built[name].train_size  # every example
    scores = wl.evaluate(wl.make_model(0), "cpu", split="validation")
    assert all(v != v for v in scores.values())  # NaN: nothing to score


@pytest.mark.parametrize("fraction", [-0.1, 0.6, "0.1", True])
def test_a_bad_fraction_names_the_key(text_fixtures, fraction):
    with pytest.raises(ConfigError, match=r"workload\.validation_fraction must be a number"):
        workloads.build({**text_spec(text_fixtures, "mlm"), "validation_fraction": fraction})
