"""SQuAD v1.1 (Rajpurkar et al. 2016): extractive question answering. F1 and exact match
with the official evaluation script's normalisation, and the eval loss of the span heads.

A long context is split into windows of ``max_length`` tokens overlapping by
``doc_stride`` (features); a training feature whose window does not hold the answer points
at the ``[CLS]`` token, as in the HF QA examples. Evaluation takes, per question, the
highest-scoring span (start logit + end logit, at most ``max_answer_length`` tokens, inside
the context) over all of its features.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from localsgd.records.record import Metric
from localsgd.util.checks import ConfigError
from localsgd.workloads.base import EVAL_LOSS, Device, validation_split
from localsgd.workloads.text.base import Tensors, TextWorkload, compact, subset
from localsgd.workloads.text.config import SQUAD_DEV, SQUAD_TRAIN, SquadConfig, SquadData

F1 = Metric("f1", "F1", "%", True, 100.0)
EXACT_MATCH = Metric("exact_match", "exact match", "%", True, 100.0)


# -- the official evaluation (SQuAD v1.1 evaluate-v1.1.py) -----------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, truth: str) -> float:
    predicted, true = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(predicted) & Counter(true)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(true)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def score(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """Mean F1 and exact match, each the best over a question's gold answers (fractions)."""
    if not predictions:
        return {"f1": float("nan"), "exact_match": float("nan")}
    f1 = sum(max(f1_score(p, a) for a in gold) for p, gold in zip(predictions, answers))
    em = sum(max(exact_match(p, a) for a in gold) for p, gold in zip(predictions, answers))
    return {"f1": f1 / len(predictions), "exact_match": em / len(predictions)}


# -- reading and tokenising --------------------------------------------------------------------

Example = dict[str, Any]


def read_examples(path: Path) -> list[Example]:
    """Questions of a SQuAD v1.1 file: ``question``, ``context``, ``answers`` (texts) and
    the first answer's ``answer_start``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        examples = []
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = qa["answers"]
                    if not answers:
                        continue
                    examples.append(
                        {
                            "question": qa["question"].lstrip(),
                            "context": context,
                            "answers": [a["text"] for a in answers],
                            "answer_start": int(answers[0]["answer_start"]),
                        }
                    )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"workload.data.path: {path} is not a SQuAD v1.1 file ({type(exc).__name__}: {exc})"
        ) from None
    return examples


class Squad(TextWorkload):
    """Extractive QA with ``AutoModelForQuestionAnswering``."""

    metrics: tuple[Metric, ...] = (F1, EXACT_MATCH, EVAL_LOSS)
    primary = "f1"
    auto_class = "AutoModelForQuestionAnswering"
    kind = "squad"

    def __init__(self, options: SquadConfig) -> None:
        super().__init__("squad", options)

    @property
    def squad_data(self) -> SquadData:
        assert isinstance(self.data_options, SquadData)
        return self.data_options

    def data_files(self) -> list[Path]:
        d = self.data_options
        return [d.file(SQUAD_TRAIN), d.file(SQUAD_DEV)]

    def tokenise(self) -> dict[str, Any]:
        d = self.data_options
        train_file, dev_file = self.data_files()
        train = read_examples(train_file)
        train = [train[i] for i in subset(len(train), d.train_subset, d.subset_seed)]
        dev = read_examples(dev_file)[: d.eval_subset]
        features, _, train_example = self._features(train)
        eval_features, offsets, example_of = self._features(dev)
        return {
            "train": features,
            "train_example": train_example,
            # The questions themselves: the validation split tokenises those it holds out
            # again, with the offsets and answers its evaluation needs.
            "train_examples": train,
            "eval": eval_features,
            "eval_offsets": offsets,
            "eval_example": example_of,
            "contexts": [e["context"] for e in dev],
            "answers": [e["answers"] for e in dev],
        }

    def _features(self, examples: list[Example]) -> tuple[Tensors, torch.Tensor, torch.Tensor]:
        """Windows of every example with their answer positions; the character offsets of
        context tokens (-1 elsewhere) and each window's example index."""
        d = self.squad_data
        if not examples:
            raise ConfigError(f"workload.data.path '{d.path}': a SQuAD file without answered questions")
        pad_right = self.tokenizer.padding_side == "right"
        encoded = self.tokenizer(
            [e["question"] for e in examples] if pad_right else [e["context"] for e in examples],
            [e["context"] for e in examples] if pad_right else [e["question"] for e in examples],
            truncation="only_second" if pad_right else "only_first",
            max_length=d.max_length,
            stride=d.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding="max_length",
        )
        context_id = 1 if pad_right else 0
        cls_index = 0
        starts, ends, offsets = [], [], []
        example_of = encoded["overflow_to_sample_mapping"]
        for i, mapping in enumerate(encoded["offset_mapping"]):
            sequence_ids = encoded.sequence_ids(i)
            example = examples[example_of[i]]
            first = example["answer_start"]
            last = first + len(example["answers"][0])
            context = [k for k, s in enumerate(sequence_ids) if s == context_id]
            offsets.append([list(m) if s == context_id else [-1, -1] for m, s in zip(mapping, sequence_ids)])
            if not context or mapping[context[0]][0] > first or mapping[context[-1]][1] < last:
                starts.append(cls_index)
                ends.append(cls_index)
                continue
            start = next(k for k in context if mapping[k][1] > first)
            end = next(k for k in reversed(context) if mapping[k][0] < last)
            starts.append(start)
            ends.append(end)
        features = compact(encoded, list(self.tokenizer.model_input_names))
        features["start_positions"] = torch.tensor(starts, dtype=torch.int32)
        features["end_positions"] = torch.tensor(ends, dtype=torch.int32)
        return features, torch.tensor(offsets, dtype=torch.int32), torch.tensor(example_of, dtype=torch.int32)

    def hold_out(self, fraction: float) -> tuple[Tensors, int]:
        """Hold out questions, each with all of its context windows (a window of a held-out
        question in training would leak its answer), and keep their windows' offsets,
        contexts and answers for :meth:`score`."""
        examples: list[Example] = self.data["train_examples"]
        _, held = validation_split(len(examples), fraction)
        in_held = torch.isin(self.data["train_example"].long(), held)
        train = {k: v[~in_held] for k, v in self.data["train"].items()}
        chosen = [examples[i] for i in held.tolist()]
        self.held_out = {"contexts": [e["context"] for e in chosen], "answers": [e["answers"] for e in chosen]}
        if chosen:
            features, offsets, example_of = self._features(chosen)
            self.held_out.update(eval=features, eval_offsets=offsets, eval_example=example_of)
        return train, len(chosen)

    def score(self, model: nn.Module, device: Device, split: str) -> dict[str, float]:
        """F1 and exact match of the best span per question; the eval loss of the features.
        Test: the dev set; validation: the held-out training questions (NaN for none)."""
        data = self.held_out if split == "validation" else self.data
        if not data["answers"]:
            return {"f1": math.nan, "exact_match": math.nan, "eval_loss": math.nan}
        max_answer = self.squad_data.max_answer_length
        offsets = data["eval_offsets"]
        example_of = data["eval_example"]
        n_examples = len(data["answers"])
        best_score = torch.full((n_examples,), -torch.inf, dtype=torch.float64)
        best_span = torch.zeros(n_examples, 2, dtype=torch.long)
        best_feature = torch.full((n_examples,), -1, dtype=torch.long)
        loss_sum, count, start = 0.0, 0, 0
        for batch in self.eval_batches(data["eval"], device):
            out = model(**batch)
            n = len(batch["input_ids"])
            loss_sum += float(out.loss) * n
            count += n
            scores, spans = best_spans(
                out.start_logits.float().cpu(),
                out.end_logits.float().cpu(),
                offsets[start : start + n, :, 0] >= 0,
                max_answer,
            )
            for j in range(n):
                e = int(example_of[start + j])
                if scores[j] > best_score[e]:
                    best_score[e] = scores[j]
                    best_span[e] = spans[j]
                    best_feature[e] = start + j
            start += n
        predictions = []
        for e in range(n_examples):
            f = int(best_feature[e])
            if f < 0:
                predictions.append("")
                continue
            s, t = (int(x) for x in best_span[e])
            predictions.append(data["contexts"][e][int(offsets[f, s, 0]) : int(offsets[f, t, 1])])
        return {**score(predictions, data["answers"]), "eval_loss": loss_sum / max(count, 1)}


def best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, in_context: torch.Tensor, max_answer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature, the best score start + end over spans inside the context of at most
    ``max_answer`` tokens, and its (start, end) token indices; -inf where none is valid."""
    length = start_logits.shape[1]
    i = torch.arange(length)
    allowed = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < max_answer)
    valid = allowed[None] & in_context[:, :, None] & in_context[:, None, :]
    scores = start_logits[:, :, None] + end_logits[:, None, :]
    scores = scores.masked_fill(~valid, -torch.inf).flatten(1)
    best, index = scores.max(1)
    return best.double(), torch.stack([index // length, index % length], 1)
