"""MNLI (Williams et al. 2018, GLUE): does the premise entail, contradict or say nothing
about the hypothesis? Accuracy on the matched (genres seen in training) and mismatched
(unseen genres) development sets, and the eval loss on the matched one.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from localsgd.records.record import Metric
from localsgd.util.checks import ConfigError
from localsgd.workloads.base import EVAL_LOSS, Device
from localsgd.workloads.text.base import Tensors, TextWorkload, compact, subset
from localsgd.workloads.text.config import MNLI_MATCHED, MNLI_MISMATCHED, MNLI_TRAIN, MnliConfig

LABELS = ("entailment", "neutral", "contradiction")
"""GLUE's label order (as the HF datasets' ``glue/mnli``)."""

ACCURACY_MATCHED = Metric("accuracy_matched", "accuracy (matched)", "%", True, 100.0)
ACCURACY_MISMATCHED = Metric("accuracy_mismatched", "accuracy (mismatched)", "%", True, 100.0)

Pairs = tuple[list[str], list[str], list[int]]


def read_pairs(path: Path) -> Pairs:
    """Premises, hypotheses and label ids of a GLUE MNLI ``.tsv`` (columns ``sentence1``,
    ``sentence2``, ``gold_label``) or a ``.jsonl`` (``premise``, ``hypothesis``, ``label``
    as a name or an id). Rows without a gold label (``-``) are skipped, as GLUE does."""
    premises: list[str] = []
    hypotheses: list[str] = []
    labels: list[int] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    premise, hypothesis, label = row["premise"], row["hypothesis"], row["label"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ConfigError(
                        f"workload.data.path: {path} line {number} is not a JSON object with premise, "
                        f"hypothesis and label ({type(exc).__name__}: {exc})"
                    ) from None
                label_id = label if isinstance(label, int) else _label_id(label)
                if label_id is None or not 0 <= label_id < len(LABELS):
                    continue
                premises.append(str(premise))
                hypotheses.append(str(hypothesis))
                labels.append(label_id)
        return premises, hypotheses, labels
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        wanted = ("sentence1", "sentence2", "gold_label")
        if header is None or not all(c in header for c in wanted):
            raise ConfigError(
                f"workload.data.path: {path} is not a GLUE MNLI file: its header lacks {list(wanted)}"
            )
        i1, i2, il = (header.index(c) for c in wanted)
        for row in reader:
            if len(row) <= max(i1, i2, il):
                continue
            label_id = _label_id(row[il])
            if label_id is None:
                continue
            premises.append(row[i1])
            hypotheses.append(row[i2])
            labels.append(label_id)
    return premises, hypotheses, labels


def _label_id(name: object) -> int | None:
    return LABELS.index(name) if isinstance(name, str) and name in LABELS else None


class Mnli(TextWorkload):
    """Sequence-pair classification with ``AutoModelForSequenceClassification`` (3 labels)."""

    metrics: tuple[Metric, ...] = (ACCURACY_MATCHED, ACCURACY_MISMATCHED, EVAL_LOSS)
    primary = "accuracy_matched"
    auto_class = "AutoModelForSequenceClassification"
    kind = "mnli"

    def __init__(self, options: MnliConfig) -> None:
        super().__init__("mnli", options)

    def task_fields(self) -> dict[str, Any]:
        return {
            "num_labels": len(LABELS),
            "id2label": dict(enumerate(LABELS)),
            "label2id": {name: i for i, name in enumerate(LABELS)},
        }

    def data_files(self) -> list[Path]:
        d = self.data_options
        return [d.file(MNLI_TRAIN), d.file(MNLI_MATCHED), d.file(MNLI_MISMATCHED)]

    def tokenise(self) -> dict[str, Any]:
        d = self.data_options
        train, matched, mismatched = (read_pairs(p) for p in self.data_files())
        return {
            "train": self._encode(train, subset(len(train[2]), d.train_subset, d.subset_seed)),
            "matched": self._encode(matched, list(range(len(matched[2])))[: d.eval_subset]),
            "mismatched": self._encode(mismatched, list(range(len(mismatched[2])))[: d.eval_subset]),
        }

    def _encode(self, pairs: Pairs, keep: list[int]) -> Tensors:
        premises, hypotheses, labels = pairs
        if not keep:
            return {
                "input_ids": torch.zeros(0, 1, dtype=torch.int32),
                "labels": torch.zeros(0, dtype=torch.int32),
            }
        encoded = self.tokenizer(
            [premises[i] for i in keep],
            [hypotheses[i] for i in keep],
            truncation=True,
            max_length=self.data_options.max_length,
            padding="longest",
        )
        out = compact(encoded, list(self.tokenizer.model_input_names))
        out["labels"] = torch.tensor([labels[i] for i in keep], dtype=torch.int32)
        return out

    def score(self, model: nn.Module, device: Device, split: str) -> dict[str, float]:
        """Test: accuracy on dev matched and mismatched, mean cross-entropy on dev matched.
        Validation: the held-out training pairs, whose genres are the matched ones: their
        accuracy as ``accuracy_matched`` (``accuracy_mismatched`` NaN) and their
        cross-entropy."""
        if split == "validation":
            accuracy, loss = self._classify(model, self.held_out, device)
            return {"accuracy_matched": accuracy, "accuracy_mismatched": math.nan, "eval_loss": loss}
        accuracy, loss = self._classify(model, self.data["matched"], device)
        accuracy_mm, _ = self._classify(model, self.data["mismatched"], device)
        return {"accuracy_matched": accuracy, "accuracy_mismatched": accuracy_mm, "eval_loss": loss}

    def _classify(self, model: nn.Module, tensors: Tensors, device: Device) -> tuple[float, float]:
        """Accuracy and mean cross-entropy over ``tensors`` (NaN for none)."""
        n = len(tensors["labels"])
        if n == 0:
            return float("nan"), float("nan")
        correct = 0
        loss_sum = 0.0
        for batch in self.eval_batches(tensors, device):
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        return correct / n, loss_sum / n
