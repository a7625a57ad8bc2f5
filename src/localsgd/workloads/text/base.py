"""What the text workloads share: model and tokenizer from local files, tokenised data
cached on disk, sharded batches of token tensors, evaluation in batches.

A batch is a dict of tensors the model takes as keyword arguments (``input_ids``,
``attention_mask``, ``token_type_ids`` and the task's targets); the loss is the model's
own (``model(**batch).loss``). Sharding is the workloads' contract: a permutation drawn
from ``(seed, epoch)`` cut into contiguous shards, one per rank.

Tokenised data is cached under ``data.cache`` (default ``~/.cache/localsgd/text``), keyed
by the tokenizer files, the data files' contents and every option that changes the
result, so a study tokenises once and a changed file or option tokenises again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from localsgd.records.record import Metric
from localsgd.util.checks import ConfigError, check_int, to_dict
from localsgd.util.files import atomic_path
from localsgd.workloads.base import (
    Batch,
    Device,
    augment_generator,
    cache_dir,
    check_rank,
    check_split,
    full_batches,
    shard_indices,
    validation_split,
)
from localsgd.workloads.text import hf
from localsgd.workloads.text.config import DataOptions, ModelConfig, TextConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 2
"""Bumped whenever tokenisation changes what it writes: old cache entries are not read."""

Tensors = dict[str, torch.Tensor]


def subset(n: int, keep: int | None, seed: int) -> list[int]:
    """The first ``keep`` of ``n`` indices after a shuffle seeded by ``seed`` (all of
    them, in file order, when ``keep`` is None)."""
    if keep is None:
        return list(range(n))
    order = np.random.default_rng(seed).permutation(n)
    return [int(i) for i in order[:keep]]


MASKS = ("attention_mask", "token_type_ids")


def compact(encoded: Any, names: list[str]) -> Tensors:
    """Padded integer columns as small tensors (masks int8, the rest int32): the cache and
    memory hold a fraction of int64's bytes; batches are widened on the way out."""
    out: Tensors = {}
    for name in names:
        if name in encoded:
            t = torch.as_tensor(np.asarray(encoded[name]))
            out[name] = t.to(torch.int8 if name in MASKS else torch.int32)
    return out


class TextWorkload:
    """Base of the text workloads; subclasses tokenise and score.

    The validation split is held out of the cached training tensors when the workload is
    built (:meth:`hold_out`), so the tokenised cache does not depend on it."""

    metrics: tuple[Metric, ...] = ()
    primary: str = ""
    auto_class: ClassVar[str] = ""
    """The ``transformers`` auto class of the task's model."""
    kind: ClassVar[str] = ""
    """The cache file prefix."""
    held_out: dict[str, Any]
    """What evaluating the validation split needs (set by :meth:`hold_out`)."""

    def __init__(self, name: str, options: Any) -> None:
        assert isinstance(options, TextConfig)
        self.name = name
        self.options = options
        self.config = to_dict(options)
        model: ModelConfig = options.model  # type: ignore[attr-defined]
        self.data_options: DataOptions = options.data  # type: ignore[attr-defined]
        self.tokenizer = hf.load_tokenizer(model)
        config = hf.model_config(model, self.tokenizer)
        positions = hf.max_positions(config)
        if positions is not None and self.data_options.max_length > positions:
            raise ConfigError(
                f"workload.data.max_length = {self.data_options.max_length} exceeds the model's "
                f"max_position_embeddings = {positions}"
            )
        self.data = self._cached()
        # The task's fields (a classifier's labels) may come from the data.
        self.model_config = hf.with_task(config, **self.task_fields())
        if len(self.data["train"]["input_ids"]) == 0:
            raise ConfigError(f"workload.data.path '{self.data_options.path}' gives no training example")
        self.train, self._validation_size = self.hold_out(options.validation_fraction)

    # -- what subclasses provide -----------------------------------------------------------

    def task_fields(self) -> dict[str, Any]:
        """Config fields the task fixes (``num_labels``)."""
        return {}

    def data_files(self) -> list[Path]:
        """The files tokenisation reads (their contents key the cache)."""
        raise NotImplementedError

    def tokenise(self) -> dict[str, Any]:
        """``{"train": {name: tensor}, ...}`` plus whatever evaluation needs."""
        raise NotImplementedError

    def prepare(self, batch: Tensors, generator: torch.Generator | None) -> Tensors:
        """A training batch as the model takes it (masked LM draws its masks here)."""
        return batch

    uses_generator: ClassVar[bool] = False
    """Whether :meth:`prepare` draws random numbers (from the rank's augmentation stream)."""

    def hold_out(self, fraction: float) -> tuple[Tensors, int]:
        """Hold ``fraction`` of the training examples out for validation (see
        :func:`~localsgd.workloads.base.validation_split`): the training tensors left and
        how many examples were held out. Keeps what :meth:`score` needs to evaluate them.
        Here an example is a row of the training tensors."""
        train: Tensors = self.data["train"]
        keep, held = validation_split(len(train["input_ids"]), fraction)
        self.held_out = {k: v[held] for k, v in train.items()}
        return {k: v[keep] for k, v in train.items()}, len(held)

    def score(self, model: nn.Module, device: Device, split: str) -> dict[str, float]:
        """The metrics of ``model`` (in eval mode, without gradients) over ``split``."""
        raise NotImplementedError

    # -- the cache -------------------------------------------------------------------------

    def cache_key(self) -> str:
        model: ModelConfig = self.options.model  # type: ignore[attr-defined]
        options = {
            k: v for k, v in dataclasses.asdict(self.data_options).items() if k not in self.data_options.LOCATIONS
        }
        import tokenizers

        blob = {
            "kind": self.kind,
            "version": CACHE_VERSION,
            "tokenizers": tokenizers.__version__,
            "tokenizer": hf.fingerprint_files(hf.tokenizer_files(model.tokenizer_path)),
            "files": hf.fingerprint_files(self.data_files()),
            "options": options,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def cache_path(self) -> Path:
        root = Path(self.data_options.cache) if self.data_options.cache else cache_dir() / "text"
        return root / f"{self.kind}-{self.cache_key()}.pt"

    def _cached(self) -> dict[str, Any]:
        path = self.cache_path()
        if path.exists():
            try:
                data = torch.load(path, weights_only=True)
                log.info("%s: tokenised data read from the cache %s", self.name, path)
                return data
            except Exception as exc:  # a damaged entry is rebuilt, not fatal
                log.warning("%s: unreadable cache %s (%s); tokenising again", self.name, path, exc)
        data = self.tokenise()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        log.info("%s: tokenised once, cached at %s", self.name, path)
        return data

    # -- the workload contract -------------------------------------------------------------

    @property
    def train_size(self) -> int:
        """Training examples left after the validation split was held out."""
        return len(self.train["input_ids"])

    @property
    def validation_size(self) -> int:
        """Training examples held out as the validation split."""
        return self._validation_size

    def evaluate(self, model: nn.Module, device: Device, split: str = "test") -> dict[str, float]:
        """One value per declared metric over ``split``: ``validation`` (the examples held
        out of training) or ``test`` (the evaluation data)."""
        split = check_split(split)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self.score(model, device, split)
        finally:
            model.train(was_training)

    def export(self, model: nn.Module, folder: Path) -> Path:
        """``model`` as a ``save_pretrained`` folder with the tokenizer beside it: what
        ``[workload.model] path`` loads (a later stage's starting point). Written under a
        temporary name and renamed into place."""
        return hf.save_pretrained(model, self.tokenizer, Path(folder))

    def __repr__(self) -> str:
        return f"<workload {self.name}: {self.train_size} training sequences>"

    def make_model(self, seed: int) -> nn.Module:
        check_int("seed", seed, 0)
        model: ModelConfig = self.options.model  # type: ignore[attr-defined]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return hf.build_model(model, self.model_config, self.auto_class)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch).loss

    def steps_per_epoch(self, world_size: int, batch_size: int) -> int:
        return full_batches(self.name, self.train_size, world_size, batch_size)

    def train_batches(
        self, rank: int, world_size: int, batch_size: int, epoch: int, seed: int, device: Device
    ) -> Iterator[Batch]:
        check_rank(rank, world_size)
        steps = self.steps_per_epoch(world_size, batch_size)
        shard = shard_indices(self.train_size, rank, world_size, epoch, seed)
        chunks = shard[: steps * batch_size].split(batch_size)
        generator = augment_generator(seed, epoch, rank) if self.uses_generator else None
        return self._batches(chunks, generator, torch.device(device))

    def _batches(
        self, chunks: tuple[torch.Tensor, ...], generator: torch.Generator | None, device: torch.device
    ) -> Iterator[Batch]:
        for idx in chunks:
            batch = self.prepare({k: v[idx].long() for k, v in self.train.items()}, generator)
            yield {k: v.to(device) for k, v in batch.items()}

    def eval_batches(self, tensors: Tensors, device: Device) -> Iterator[Tensors]:
        """``tensors`` in slices of ``eval_batch_size``, widened and on ``device``."""
        n = len(tensors["input_ids"])
        size = self.options.eval_batch_size
        for start in range(0, n, size):
            yield {k: v[start : start + size].long().to(device) for k, v in tensors.items()}
