"""The single-text classification workload: TSV, CSV and JSON lines read alike, label names
mapped to ids deterministically (and recorded in the model's config), exact macro-F1, and
config errors that name the key."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from localsgd import workloads
from localsgd.util.checks import ConfigError
from textdata import text_spec

pytest.importorskip("transformers")


def rows(fx: dict[str, Path], name: str) -> list[tuple[str, str]]:
    lines = (fx["classification"] / name).read_text().splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines]  # type: ignore[misc]


def spec(fx: dict[str, Path], **data: Any) -> dict[str, Any]:
    out = text_spec(fx, "classification", **data)
    if "path" in data and data["path"] is None:
        out["data"]["path"] = None  # type: ignore[index]
    return out


@pytest.fixture(scope="module")
def tsv(text_fixtures: dict[str, Path]) -> Any:
    return workloads.build(spec(text_fixtures))


def test_the_fixture_has_six_labels_in_sorted_order(tsv):
    from localsgd.workloads.text.fixtures import NOUN_VERBS

    assert tsv.labels == sorted(NOUN_VERBS)
    assert tsv.model_config.id2label == dict(enumerate(sorted(NOUN_VERBS)))
    assert tsv.model_config.label2id == {name: i for i, name in enumerate(sorted(NOUN_VERBS))}
    assert tsv.config["data"]["labels"] == tsv.labels  # what the run trained with
    assert tsv.train_size + tsv.validation_size == 1200 and len(tsv.data["test"]["labels"]) == 400
    assert [m.name for m in tsv.metrics] == [
        "accuracy",
        "macro_f1",
        "eval_loss",
    ] and tsv.primary == "accuracy"
    counts = torch.bincount(tsv.data["train"]["labels"].long())
    assert len(counts) == 6 and int(counts.min()) > 150  # balanced enough: chance is about 1/6


def test_csv_and_json_lines_read_like_the_tsv(tmp_path, text_fixtures, tsv):
    names = tsv.labels
    for split in ("train", "test"):
        with (tmp_path / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "text", "label"])
            for i, (text, label) in enumerate(rows(text_fixtures, f"{split}.tsv")):
                writer.writerow([i, text.replace(" .", ", ."), label])  # a comma inside a quoted cell
        with (tmp_path / f"{split}.jsonl").open("w") as f:
            for text, label in rows(text_fixtures, f"{split}.tsv"):
                f.write(json.dumps({"sentence": text, "y": names.index(label)}) + "\n")
    as_csv = workloads.build(
        spec(text_fixtures, path=str(tmp_path), train_file="train.csv", test_file="test.csv")
    )
    assert as_csv.labels == names
    assert torch.equal(as_csv.data["train"]["labels"], tsv.data["train"]["labels"])
    assert len(as_csv.data["train"]["input_ids"]) == 1200
    as_json = workloads.build(
        spec(
            text_fixtures,
            path=None,
            train_file=str(tmp_path / "train.jsonl"),
            test_file=str(tmp_path / "test.jsonl"),
            label_field="y",
        )
    )
    # Integer labels keep their ids (sorted numerically); the names are the integers.
    assert as_json.labels == ["0", "1", "2", "3", "4", "5"]
    assert torch.equal(as_json.data["train"]["labels"], tsv.data["train"]["labels"])
    assert torch.equal(as_json.data["test"]["input_ids"], tsv.data["test"]["input_ids"])
    given = workloads.build(spec(text_fixtures, labels=list(reversed(names))))
    assert torch.equal(given.data["train"]["labels"], 5 - tsv.data["train"]["labels"])


def test_label_order():
    from localsgd.workloads.text.classification import label_names

    assert label_names(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_names(["neg", "pos", "neutral"]) == ["neg", "neutral", "pos"]
    assert label_names(["1", "01"]) == ["01", "1"]  # not one integer each: sorted as text
    assert label_names(["-1", "1"]) == ["-1", "1"]


def test_macro_f1_is_exact():
    from localsgd.workloads.text.classification import macro_f1

    truth = torch.tensor([0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0])
    # label 0: 2·1/(2·1 + 1 + 1) = 1/2; label 1: 2·2/(2·2 + 1 + 0) = 4/5; label 2: 0.
    assert macro_f1(predicted, truth, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-15)
    # A label neither present nor predicted has no F1 and is left out.
    assert macro_f1(predicted, truth, 5) == macro_f1(predicted, truth, 3)
    assert macro_f1(truth, truth, 3) == 1.0


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("files", "options", "message"),
    [
        ({}, {"train_file": "nope.tsv"}, r"workload\.data\.train_file '.*nope\.tsv' does not exist"),
        ({}, {"test_file": "nope.tsv"}, r"workload\.data\.test_file '.*nope\.tsv' does not exist"),
        (
            {"train.txt": "text\tlabel\na\tb\n"},
            {"train_file": "train.txt"},
            r"workload\.data\.train_file '.*train\.txt': the format of a '\.txt' file is unknown; .*"
            r"set workload\.data\.format to csv or jsonl or tsv",
        ),
        (
            {},
            {"format": "xml"},
            r"workload\.data\.format must be one of \['csv', 'jsonl', 'tsv'\], got 'xml'",
        ),
        (
            {"train.tsv": "words\tlabel\na b\tx\n"},
            {},
            r"workload\.data\.train_file '.*train\.tsv' line 2 has no text column 'text' or 'sentence' "
            r"\(its columns: \['label', 'words'\]\); name it in workload\.data\.text_field",
        ),
        (
            {"train.tsv": "text\tclass\na b\tx\n"},
            {},
            r"line 2 has no label column 'label' .*name it in workload\.data\.label_field",
        ),
        ({"train.tsv": ""}, {}, r"workload\.data\.train_file '.*train\.tsv' holds no example"),
        ({"train.tsv": "text\tlabel\n"}, {}, r"workload\.data\.train_file '.*train\.tsv' holds no example"),
        ({"train.tsv": "text\tlabel\na\t\n"}, {}, r"line 2 has an empty label"),
        (
            {"train.jsonl": '{"text": "a", "label": 1}\n[1]\n'},
            {"train_file": "train.jsonl"},
            r"line 2 is not a JSON object",
        ),
        ({"train.tsv": "text\tlabel\na\tx\nb\tx\n"}, {}, r"has a single label \['x'\]: nothing to classify"),
        (
            {"train.tsv": "text\tlabel\na\tx\nb\ty\n", "test.tsv": "text\tlabel\na\tz\n"},
            {},
            r"workload\.data\.test_file '.*test\.tsv': example 1 has the label 'z', not one of \['x', 'y'\]; "
            r"list every label in workload\.data\.labels",
        ),
        ({}, {"labels": ["a", "a"]}, r"workload\.data\.labels names a label twice"),
        ({}, {"path": "/nonexistent"}, r"workload\.data\.path '/nonexistent' does not exist"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text_fixtures, files, options, message):
    for name in ("train.tsv", "test.tsv"):
        write(tmp_path / name, (text_fixtures["classification"] / name).read_text())
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=message):
        workloads.build(spec(text_fixtures, **{"path": str(tmp_path), **options}))
