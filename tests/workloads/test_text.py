"""The text workloads on the fixtures: formats read, data cached, masking, metrics, config
errors, and a tiny BERT that learns what the fixtures teach (well above chance)."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from localsgd import workloads
from localsgd.util.checks import ConfigError
from textdata import text_spec

pytest.importorskip("transformers")

TEXT_WORKLOADS = ("mnli", "squad", "mlm", "classification")


@pytest.fixture(scope="module")
def built(text_fixtures: dict[str, Path]) -> dict[str, Any]:
    return {name: workloads.build(text_spec(text_fixtures, name)) for name in TEXT_WORKLOADS}


def finetune(wl: Any, steps: int, lr: float, batch: int = 32) -> torch.nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # dropout draws from the global stream: the same whatever ran before
    model = wl.make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    done, epoch = 0, 0
    while done < steps:
        for b in wl.train_batches(0, 1, batch, epoch, 0, "cpu"):
            opt.zero_grad()
            wl.loss(model, b).backward()
            opt.step()
            done += 1
            if done == steps:
                break
        epoch += 1
    return model


def test_import_localsgd_imports_no_text_stack():
    code = (
        "import sys, localsgd, localsgd.workloads, localsgd.run.config\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'tokenizers', 'datasets')]\n"
        "assert not heavy, heavy\n"
        "assert {'mnli', 'squad', 'mlm', 'classification'} <= set(localsgd.workloads.names())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_batches_are_dicts_the_model_takes_and_shards_are_disjoint(built):
    wl = built["mnli"]
    assert wl.train_size == 2700 and wl.validation_size == 300 and wl.primary == "accuracy_matched"
    assert [m.name for m in wl.metrics] == ["accuracy_matched", "accuracy_mismatched", "eval_loss"]
    batches = [list(wl.train_batches(r, 2, 16, epoch=0, seed=3, device="cpu")) for r in range(2)]
    first = batches[0][0]
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert first["input_ids"].dtype == torch.long and first["input_ids"].shape[0] == 16
    assert len(batches[0]) == len(batches[1]) == wl.steps_per_epoch(2, 16) == 84
    assert not torch.equal(batches[0][0]["input_ids"], batches[1][0]["input_ids"])  # shards differ
    again = next(iter(wl.train_batches(0, 2, 16, epoch=0, seed=3, device="cpu")))
    assert all(torch.equal(first[k], again[k]) for k in first)
    loss = wl.loss(wl.make_model(0), first).detach()
    assert loss.ndim == 0 and 0.5 < float(loss) < 2.0  # about log 3 before training


def test_tokenised_data_is_cached_and_keyed_by_options(text_fixtures, built, caplog):
    with caplog.at_level(logging.INFO, logger="localsgd.workloads.text.base"):
        again = workloads.build(text_spec(text_fixtures, "mnli"))
        assert "read from the cache" in caplog.text
        caplog.clear()
        shorter = workloads.build(text_spec(text_fixtures, "mnli", max_length=16, train_subset=100))
        assert "tokenised once" in caplog.text
    assert torch.equal(again.train["input_ids"], built["mnli"].train["input_ids"])
    assert shorter.train_size + shorter.validation_size == 100 and shorter.validation_size == 10
    assert shorter.train["input_ids"].shape[1] == 16
    assert again.cache_path() != shorter.cache_path()


def test_train_subset_is_the_first_n_after_a_seeded_shuffle(text_fixtures, built):
    a = workloads.build(text_spec(text_fixtures, "mnli", train_subset=40))
    b = workloads.build(text_spec(text_fixtures, "mnli", train_subset=80))
    c = workloads.build(text_spec(text_fixtures, "mnli", train_subset=40, subset_seed=1))
    first, second = a.data["train"]["input_ids"], b.data["train"]["input_ids"]  # before the split
    assert torch.equal(first[:40], second[:40, : first.shape[1]])
    assert not torch.equal(a.data["train"]["labels"], c.data["train"]["labels"])


def test_mlm_masks_15_percent_with_the_80_10_10_rule(built):
    wl = built["mlm"]
    ids = torch.cat([wl.train["input_ids"].long()] * 4)
    batch = wl.prepare({"input_ids": ids}, torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(wl.tokenizer.all_special_ids))
    chosen = batch["labels"] != -100
    assert not (chosen & special).any()
    assert torch.equal(batch["labels"][chosen], ids[chosen])
    share = chosen.sum() / (~special).sum()
    masked = (batch["input_ids"] == wl.tokenizer.mask_token_id) & chosen
    kept = (batch["input_ids"] == ids) & chosen
    assert abs(float(share) - 0.15) < 0.01
    assert abs(float(masked.sum() / chosen.sum()) - 0.8) < 0.02
    assert abs(float(kept.sum() / chosen.sum()) - 0.1) < 0.02  # a random token may hit the original
    assert torch.equal(built["mlm"]._eval["labels"], wl._eval["labels"])  # fixed eval masks


def test_squad_official_normalisation_and_scores():
    from localsgd.workloads.text.squad import exact_match, f1_score, normalize_answer, score

    assert normalize_answer("The  Dark-Purple, an Apple!") == "darkpurple apple"
    assert exact_match("the Tokyo.", "Tokyo") == 1.0
    assert f1_score("dark purple car", "dark purple") == pytest.approx(0.8)
    assert f1_score("red", "blue") == 0.0
    assert score(["tokyo", "x"], [["Paris", "Tokyo"], ["y"]]) == {"f1": 0.5, "exact_match": 0.5}


def test_squad_windows_hold_the_answer_positions(built):
    wl = built["squad"]
    train = wl.train
    tokenizer = wl.tokenizer
    found = 0
    for i in range(50):
        s, e = int(train["start_positions"][i]), int(train["end_positions"][i])
        if s == 0:
            continue
        found += 1
        text = tokenizer.decode(train["input_ids"][i, s : e + 1].tolist())
        assert text and text in " ".join(
            v
            for values in __import__("localsgd.workloads.text.fixtures", fromlist=["x"]).ATTRIBUTES.values()
            for v in values
        )
    assert found > 30


@pytest.mark.parametrize(
    ("name", "steps", "lr"),
    [("mnli", 250, 3e-3), ("squad", 300, 3e-3), ("mlm", 60, 3e-3), ("classification", 200, 3e-3)],
)
def test_a_fine_tuned_tiny_bert_beats_chance_clearly(built, name, steps, lr):
    wl = built[name]
    before = wl.evaluate(wl.make_model(0), "cpu")
    after = wl.evaluate(finetune(wl, steps, lr), "cpu")
    if name == "mnli":  # three balanced classes: chance is 1/3
        assert before["accuracy_matched"] < 0.45
        assert after["accuracy_matched"] > 0.6 and after["accuracy_mismatched"] > 0.55
        assert after["eval_loss"] < before["eval_loss"] - 0.2
    elif name == "squad":
        assert after["f1"] > before["f1"] + 0.2 and after["exact_match"] > before["exact_match"] + 0.15
    elif name == "classification":  # six balanced labels: chance is 1/6
        assert before["accuracy"] < 0.3
        assert after["accuracy"] > 0.6 and after["macro_f1"] > 0.5
        assert after["eval_loss"] < before["eval_loss"] - 0.5
    else:  # the untrained model is near uniform over the vocabulary
        assert before["eval_loss"] > 0.9 * math.log(len(wl.tokenizer))
        assert after["eval_loss"] < before["eval_loss"] - 2.0
        assert after["perplexity"] == pytest.approx(math.exp(after["eval_loss"]))


def test_model_from_a_local_checkpoint(tmp_path, text_fixtures, built):
    model = built["mnli"].make_model(1)
    model.save_pretrained(tmp_path / "ckpt")
    built["mnli"].tokenizer.save_pretrained(tmp_path / "ckpt")
    spec = text_spec(text_fixtures, "mnli")
    spec["model"] = {"path": str(tmp_path / "ckpt")}
    wl = workloads.build(spec)
    loaded = wl.make_model(5)
    for (n, p), q in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model": {"path": "/nonexistent/ckpt"}},
            r"workload\.model\.path '/nonexistent/ckpt' does not exist",
        ),
        ({"model": {}}, r"workload\.model needs exactly one of path"),
        (
            {"model": {"config": {"hidden_size": 8}, "tokenizer": "."}},
            r"workload\.model\.config needs model_type",
        ),
        ({"model": {"config": {"model_type": "bert"}}}, r"workload\.model\.tokenizer is required"),
        ({"data": {"path": "/nonexistent"}}, r"workload\.data\.path '/nonexistent' does not exist"),
        ({"data": {"max_length": 2}}, r"workload\.data\.max_length must be an integer in \[8, "),
        (
            {"data": {"max_length": 4096}},
            r"workload\.data\.max_length = 4096 exceeds the model's max_position_embeddings = 128",
        ),
        ({"data": {"colour": 1}}, r"unknown key 'workload\.data\.colour'"),
        ({"model": None}, r"workload\.model must be a table"),
    ],
)
def test_config_errors_name_the_key(text_fixtures, change, message):
    spec = text_spec(text_fixtures, "mnli")
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(spec[key], dict) and key == "data":
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    with pytest.raises(ConfigError, match=message):
        workloads.build(spec)


def test_missing_data_files_are_named(tmp_path, text_fixtures):
    (tmp_path / "train.tsv").write_text("x\n")
    spec = text_spec(text_fixtures, "mnli")
    spec["data"] = {**spec["data"], "path": str(tmp_path)}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"holds no dev_matched\.tsv or dev_matched\.jsonl"):
        workloads.build(spec)
    with pytest.raises(ConfigError, match=r"missing key 'workload\.data'"):
        workloads.build({"name": "squad", "model": spec["model"]})


def test_mnli_jsonl_is_read_like_the_tsv(tmp_path, text_fixtures):
    import json

    from localsgd.workloads.text.mnli import read_pairs

    premises, hypotheses, labels = read_pairs(text_fixtures["mnli"] / "dev_matched.tsv")
    for name in ("train", "dev_matched", "dev_mismatched"):
        rows = [
            json.dumps({"premise": p, "hypothesis": h, "label": ["entailment", 1, "contradiction"][y]})
            for p, h, y in zip(premises, hypotheses, labels)
        ]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    assert read_pairs(tmp_path / "train.jsonl") == (
        premises,
        hypotheses,
        [y if y != 1 else 1 for y in labels],
    )


def test_the_fixtures_are_the_same_files_on_every_call(tmp_path, text_fixtures):
    from localsgd.workloads.text.fixtures import write_fixtures

    write_fixtures(tmp_path)
    theirs = text_fixtures["tokenizer"].parent
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) >= 9
    for name in files:
        assert (theirs / name).read_bytes() == (tmp_path / name).read_bytes(), name
