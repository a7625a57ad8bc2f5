"""Single-text classification: one label per text (sentiment as GLUE's SST-2, acceptability
as CoLA, topic, ...), read from TSV, CSV or JSON lines. Accuracy (primary), macro-F1 and the
eval loss.

Labels may be names or integers. The label set is ``data.labels`` when given (ids in its
order), else the distinct labels of the training file, sorted -- numerically when every one
is an integer, so ``0, 1, 2`` keep their ids -- and the names are written into the model's
config (``id2label``, ``label2id``), so an exported model carries the mapping. A test label
outside the set is an error naming the file and line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from localsgd.records.record import Metric
from localsgd.util.checks import ConfigError
from localsgd.workloads.base import ACCURACY, EVAL_LOSS, Device
from localsgd.workloads.text.base import Tensors, TextWorkload, compact, subset
from localsgd.workloads.text.config import TEXT_FIELDS, ClassificationConfig, ClassificationData

log = logging.getLogger(__name__)

MACRO_F1 = Metric("macro_f1", "macro-F1", "%", True, 100.0)

Examples = tuple[list[str], list[str]]
"""Texts and their labels (as text: ``"1"`` for the integer 1)."""


def read_examples(path: Path, fmt: str, key: str, text_field: str | None, label_field: str) -> Examples:
    """Texts and labels of a ``tsv`` / ``csv`` file with a header row or of a ``jsonl``
    file (one object a line). ``ConfigError`` naming ``key`` (``workload.data.train_file``)
    for a missing column, an empty label or text, a malformed line, or no example."""
    texts: list[str] = []
    labels: list[str] = []
    where = f"workload.data.{key} '{path}'"
    with path.open(encoding="utf-8", newline="") as f:
        rows = _json_rows(f, where) if fmt == "jsonl" else _table_rows(f, fmt, where)
        for row, line in rows:
            text, label = _example(row, line, where, text_field, label_field)
            texts.append(text)
            labels.append(label)
    if not texts:
        raise ConfigError(f"{where} holds no example")
    return texts, labels


def _json_rows(f: Iterable[str], where: str) -> Iterator[tuple[dict[str, Any], int]]:
    """A JSON-lines file's objects with their line numbers (blank lines skipped)."""
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} line {number} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where} line {number} is not a JSON object")
        yield row, number


def _table_rows(f: Iterable[str], fmt: str, where: str) -> Iterator[tuple[dict[str, Any], int]]:
    """A CSV or TSV file's rows (keyed by its header) with their line numbers."""
    csv.field_size_limit(sys.maxsize)
    # GLUE's TSV files quote nothing: a quote character is part of the text.
    dialect: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    reader = csv.DictReader(f, **dialect)
    for row in reader:
        if None in row:  # more cells than the header names
            raise ConfigError(f"{where} line {reader.line_num} has more cells than its header")
        if not any((v or "").strip() for v in row.values()):
            continue
        yield {k: v for k, v in row.items() if v is not None}, reader.line_num


def _example(
    row: dict[str, Any], line: int, where: str, text_field: str | None, label_field: str
) -> tuple[str, str]:
    """One row's text and label, checked."""
    text_key = text_field if text_field is not None else next((f for f in TEXT_FIELDS if f in row), None)
    if text_key is None or text_key not in row:
        wanted = repr(text_field) if text_field is not None else " or ".join(repr(f) for f in TEXT_FIELDS)
        raise ConfigError(
            f"{where} line {line} has no text column {wanted} (its columns: {sorted(row)}); "
            "name it in workload.data.text_field"
        )
    if label_field not in row:
        raise ConfigError(
            f"{where} line {line} has no label column {label_field!r} (its columns: {sorted(row)}); "
            "name it in workload.data.label_field"
        )
    text, label = row[text_key], row[label_field]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ConfigError(f"{where} line {line}: a label is a name or an integer, got {label!r}")
    label = str(label).strip()
    if not label:
        raise ConfigError(f"{where} line {line} has an empty label")
    if not isinstance(text, str):
        raise ConfigError(f"{where} line {line}: the text must be a string, got {text!r}")
    return text, label


def label_names(labels: list[str]) -> list[str]:
    """The distinct labels, sorted: numerically when every one is an integer (written
    once: ``"1"`` and ``"01"`` sort as text)."""
    distinct = set(labels)
    try:
        numbers = {int(v): v for v in distinct}
    except ValueError:
        return sorted(distinct)
    return [numbers[k] for k in sorted(numbers)] if len(numbers) == len(distinct) else sorted(distinct)


def macro_f1(predicted: torch.Tensor, truth: torch.Tensor, num_labels: int) -> float:
    """The unweighted mean over labels of F1 = 2·TP / (2·TP + FP + FN), exact (integer
    counts). A label neither present nor predicted has no F1 and is left out of the mean
    (as scikit-learn's ``f1_score(average="macro")`` without ``labels``)."""
    confusion = torch.bincount(truth * num_labels + predicted, minlength=num_labels * num_labels)
    confusion = confusion.reshape(num_labels, num_labels).double()  # rows: truth, columns: predicted
    tp = confusion.diagonal()
    denominator = confusion.sum(0) + confusion.sum(1)  # 2·TP + FP + FN
    seen = denominator > 0
    if not bool(seen.any()):
        return math.nan
    return float((2 * tp[seen] / denominator[seen]).mean())


class Classification(TextWorkload):
    """Single-text classification with ``AutoModelForSequenceClassification`` (a checkpoint
    of another head, a masked LM's say, loads its encoder and starts a new classifier)."""

    metrics: tuple[Metric, ...] = (ACCURACY, MACRO_F1, EVAL_LOSS)
    primary = "accuracy"
    auto_class = "AutoModelForSequenceClassification"
    kind = "classification"

    def __init__(self, options: ClassificationConfig) -> None:
        super().__init__("classification", options)
        self.labels: list[str] = list(self.data["labels"])
        self.config["data"]["labels"] = self.labels  # the mapping this run trained with
        log.info("%s: label ids %s", self.name, dict(enumerate(self.labels)))

    @property
    def classification_data(self) -> ClassificationData:
        assert isinstance(self.data_options, ClassificationData)
        return self.data_options

    def task_fields(self) -> dict[str, Any]:
        labels = list(self.data["labels"])
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }

    def data_files(self) -> list[Path]:
        d = self.classification_data
        return [d.file_of("train_file"), d.file_of("test_file")]

    def tokenise(self) -> dict[str, Any]:
        d = self.classification_data
        sets = {
            key: read_examples(d.file_of(key), d.format_of(key), key, d.text_field, d.label_field)
            for key in ("train_file", "test_file")
        }
        names = list(d.labels) if d.labels is not None else label_names(sets["train_file"][1])
        if len(names) < 2:
            raise ConfigError(
                f"workload.data.train_file '{d.file_of('train_file')}' has a single label {names}: nothing to classify"
            )
        texts, labels = sets["train_file"]
        test_texts, test_labels = sets["test_file"]
        return {
            "labels": names,
            "train": self._encode(
                texts, labels, names, "train_file", subset(len(texts), d.train_subset, d.subset_seed)
            ),
            "test": self._encode(
                test_texts, test_labels, names, "test_file", list(range(len(test_texts)))[: d.eval_subset]
            ),
        }

    def _encode(
        self, texts: list[str], labels: list[str], names: list[str], key: str, keep: list[int]
    ) -> Tensors:
        ids = {name: i for i, name in enumerate(names)}
        for i, label in enumerate(labels):
            if label not in ids:
                file = self.classification_data.file_of(key)
                raise ConfigError(
                    f"workload.data.{key} '{file}': example {i + 1} has the label {label!r}, not one of "
                    f"{names}"
                    + (
                        ""
                        if self.classification_data.labels
                        else "; list every label in workload.data.labels"
                    )
                )
        encoded = self.tokenizer(
            [texts[i] for i in keep],
            truncation=True,
            max_length=self.data_options.max_length,
            padding="longest",
        )
        out = compact(encoded, list(self.tokenizer.model_input_names))
        out["labels"] = torch.tensor([ids[labels[i]] for i in keep], dtype=torch.int32)
        return out

    def score(self, model: nn.Module, device: Device, split: str) -> dict[str, float]:
        """Accuracy, macro-F1 over the label set and mean cross-entropy over ``split``:
        the test file, or the training examples held out for validation (NaN for none)."""
        tensors = self.held_out if split == "validation" else self.data["test"]
        n = len(tensors["labels"])
        if n == 0:
            return {"accuracy": math.nan, "macro_f1": math.nan, "eval_loss": math.nan}
        predicted, truth = [], []
        loss_sum = 0.0
        for batch in self.eval_batches(tensors, device):
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            predicted.append(logits.argmax(-1).cpu())
            truth.append(labels.cpu())
        pred, true = torch.cat(predicted), torch.cat(truth)
        return {
            "accuracy": float((pred == true).double().mean()),
            "macro_f1": macro_f1(pred, true, len(self.labels)),
            "eval_loss": loss_sum / n,
        }
