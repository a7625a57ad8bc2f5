"""Masked-LM (continued) pretraining (Devlin et al. 2019) on plain text: the STILT proxy
for pretraining. Eval loss (primary: cross-entropy over the masked tokens) and perplexity.

Documents are tokenised with their special tokens, concatenated and cut into blocks of
``max_length`` tokens (the tail is dropped), as HF's ``run_mlm`` does. Each training batch
draws its masks from the rank's augmentation stream (seeded from seed, epoch, rank): 15 %
of the non-special tokens are chosen; of those 80 % become ``[MASK]``, 10 % a random token,
10 % stay. The evaluation blocks (the held-out text, and the validation blocks held out of
the training ones) are masked once, with a fixed seed, so every evaluation of every run
scores the same positions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from localsgd.records.record import Metric
from localsgd.util.checks import ConfigError
from localsgd.workloads.base import EVAL_LOSS, Device
from localsgd.workloads.text.base import Tensors, TextWorkload, subset
from localsgd.workloads.text.config import MlmConfig, MlmData, text_files

PERPLEXITY = Metric("perplexity", "perplexity", "", False)
EVAL_MASK_SEED = 0x4D4C4D
IGNORE = -100
"""The label of positions the loss skips (transformers' convention)."""


def read_documents(path: str, document: str) -> list[str]:
    """Every non-empty line (``document = "line"``) or every file (``"file"``) of a
    ``.txt`` file or folder."""
    docs: list[str] = []
    for f in text_files(path):
        text = f.read_text(encoding="utf-8", errors="replace")
        if document == "file":
            if text.strip():
                docs.append(text)
        else:
            docs.extend(line for line in text.splitlines() if line.strip())
    return docs


def mask_tokens(
    ids: torch.Tensor,
    special: torch.Tensor,
    probability: float,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: (masked input ids, labels with -100 where nothing is predicted)."""
    chance = torch.full(ids.shape, probability).masked_fill(special, 0.0)
    chosen = torch.bernoulli(chance, generator=generator).bool()
    labels = ids.masked_fill(~chosen, IGNORE)
    masked = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & chosen
    randomised = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool() & chosen & ~masked
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    out = ids.masked_fill(masked, mask_id)
    out = torch.where(randomised, random_ids, out)
    return out, labels


class MaskedLM(TextWorkload):
    """Masked-LM with ``AutoModelForMaskedLM``."""

    metrics: tuple[Metric, ...] = (EVAL_LOSS, PERPLEXITY)
    primary = "eval_loss"
    auto_class = "AutoModelForMaskedLM"
    kind = "mlm"
    uses_generator = True

    def __init__(self, options: MlmConfig) -> None:
        super().__init__("mlm", options)
        if self.tokenizer.mask_token_id is None:
            raise ConfigError(f"workload.model.tokenizer '{options.model.tokenizer_path}' has no mask token")
        self._special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        self._vocab = len(self.tokenizer)
        self._eval = self._fixed_masks(self.data["eval"]["input_ids"])
        self._validation = self._fixed_masks(self.held_out["input_ids"])

    def _fixed_masks(self, blocks: torch.Tensor) -> Tensors:
        """Evaluation blocks masked once, from a fixed seed: every evaluation of every run
        scores the same positions."""
        ids = blocks.long()
        masked, labels = mask_tokens(
            ids,
            torch.isin(ids, self._special),
            self.mlm_data.mlm_probability,
            self.tokenizer.mask_token_id,
            self._vocab,
            torch.Generator().manual_seed(EVAL_MASK_SEED),
        )
        return {"input_ids": masked, "labels": labels}

    @property
    def mlm_data(self) -> MlmData:
        assert isinstance(self.data_options, MlmData)
        return self.data_options

    def data_files(self) -> list[Path]:
        d = self.mlm_data
        return text_files(d.path) + (text_files(d.eval_path) if d.eval_path else [])

    def tokenise(self) -> dict[str, Any]:
        d = self.mlm_data
        docs = read_documents(d.path, d.document)
        order = subset(len(docs), len(docs), d.subset_seed)
        if d.eval_path is not None:
            train_docs, eval_docs = [docs[i] for i in order], read_documents(d.eval_path, d.document)
        else:
            held = max(1, round(len(docs) * d.eval_fraction))
            if held >= len(docs):
                raise ConfigError(
                    f"workload.data.path '{d.path}' has {len(docs)} documents: too few to hold "
                    f"{d.eval_fraction:g} of them out; give workload.data.eval_path"
                )
            train_docs = [docs[i] for i in order[:-held]]
            eval_docs = [docs[i] for i in order[-held:]]
        train = self._blocks(train_docs)[: d.train_subset]
        evaluation = self._blocks(eval_docs)[: d.eval_subset]
        if len(evaluation) == 0:
            raise ConfigError(f"the held-out text is shorter than one block of {d.max_length} tokens")
        return {"train": {"input_ids": train}, "eval": {"input_ids": evaluation}}

    def _blocks(self, docs: list[str]) -> torch.Tensor:
        """Documents tokenised, concatenated and cut into rows of ``max_length`` tokens."""
        length = self.data_options.max_length
        ids = self.tokenizer(docs, add_special_tokens=True)["input_ids"] if docs else []
        flat = np.fromiter((t for doc in ids for t in doc), dtype=np.int32)
        rows = len(flat) // length
        return torch.from_numpy(flat[: rows * length].reshape(rows, length).copy())

    def prepare(self, batch: Tensors, generator: torch.Generator | None) -> Tensors:
        assert generator is not None
        ids = batch["input_ids"]
        masked, labels = mask_tokens(
            ids,
            torch.isin(ids, self._special),
            self.mlm_data.mlm_probability,
            self.tokenizer.mask_token_id,
            self._vocab,
            generator,
        )
        return {"input_ids": masked, "labels": labels}

    def score(self, model: nn.Module, device: Device, split: str) -> dict[str, float]:
        """Cross-entropy per masked token over the fixed masks of the split's blocks (the
        held-out text for test, the held-out training blocks for validation); its
        exponential. NaN for a split without blocks."""
        loss_sum, tokens = 0.0, 0
        for batch in self.eval_batches(self._validation if split == "validation" else self._eval, device):
            logits = model(input_ids=batch["input_ids"]).logits.float()
            labels = batch["labels"]
            loss_sum += float(
                nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
                )
            )
            tokens += int((labels != IGNORE).sum())
        if tokens == 0:
            return {"eval_loss": math.nan, "perplexity": math.nan}
        loss = loss_sum / tokens
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}
