"""transformers from local files only: tokenizers, models, fingerprints.

``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set before transformers is imported
and every load passes ``local_files_only=True``: nothing here ever tries the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from localsgd.util.checks import ConfigError
from localsgd.workloads.text.config import TOKENIZER_FILES, ModelConfig


def offline() -> None:
    """Forbid the hub: set before transformers (and huggingface_hub) read their settings."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes already


def transformers_module() -> Any:
    offline()
    try:
        import transformers
    except ImportError:
        raise ConfigError("the text workloads need transformers: pip install 'localsgd[text]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # saving a model draws one per shard
    return transformers


def load_tokenizer(model: ModelConfig) -> Any:
    """The fast tokenizer of ``model.tokenizer`` (or ``model.path``)."""
    transformers = transformers_module()
    key = "workload.model.tokenizer" if model.tokenizer is not None else "workload.model.path"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model.tokenizer_path, local_files_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{key} '{model.tokenizer_path}': cannot load a tokenizer ({type(exc).__name__}: {exc})"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{key} '{model.tokenizer_path}': a fast (tokenizers) tokenizer is needed")
    return tokenizer


def model_config(model: ModelConfig, tokenizer: Any, **task: Any) -> Any:
    """The transformers config: from the checkpoint, the file, or the table; ``task``
    fields (``num_labels``) on top. A table without ``vocab_size`` takes the tokenizer's."""
    transformers = transformers_module()
    try:
        if model.path is not None:
            config = transformers.AutoConfig.from_pretrained(model.path, local_files_only=True, **task)
            key = "workload.model.path"
        elif isinstance(model.config, str):
            source = Path(model.config)
            config_dict = json.loads((source / "config.json" if source.is_dir() else source).read_text())
            config = transformers.AutoConfig.for_model(**{**config_dict, **task})
            key = "workload.model.config"
        else:
            assert isinstance(model.config, dict)
            table = dict(model.config)
            table.setdefault("vocab_size", len(tokenizer))
            if tokenizer.pad_token_id is not None:
                table.setdefault("pad_token_id", tokenizer.pad_token_id)
            config = transformers.AutoConfig.for_model(**{**table, **task})
            key = "workload.model.config"
    except ConfigError:
        raise
    except Exception as exc:
        where = model.path or model.config
        raise ConfigError(
            f"{key} {where!r}: not a usable transformers config ({type(exc).__name__}: {exc})"
        ) from None
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"{key}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}"
        )
    config.use_cache = False
    return config


def with_task(config: Any, **task: Any) -> Any:
    """``config`` with the task's fields set (``num_labels`` first: setting it resets the
    label names, which ``id2label`` and ``label2id`` then give)."""
    if "num_labels" in task:
        config.num_labels = task["num_labels"]
    for key, value in task.items():
        if key != "num_labels":
            setattr(config, key, value)
    return config


def save_pretrained(model: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """``model`` and ``tokenizer`` written by ``save_pretrained`` into ``folder`` (a
    temporary folder beside it, renamed into place: a reader never sees half a model)."""
    plain: Any = model if hasattr(model, "save_pretrained") else getattr(model, "module", model)
    if not hasattr(plain, "save_pretrained"):
        raise TypeError(f"a {type(model).__name__} is not a transformers model: it cannot be exported")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def build_model(model: ModelConfig, config: Any, auto_class: str) -> nn.Module:
    """``AutoModelFor...`` from the checkpoint (new heads initialised from torch's RNG) or
    randomly initialised from ``config``."""
    transformers = transformers_module()
    cls = getattr(transformers, auto_class)
    if model.path is not None:
        try:
            return cls.from_pretrained(model.path, config=config, local_files_only=True).float()
        except Exception as exc:
            raise ConfigError(
                f"workload.model.path '{model.path}': cannot load weights ({type(exc).__name__}: {exc})"
            ) from None
    return cls.from_config(config).float()


def max_positions(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def fingerprint_files(paths: list[Path]) -> str:
    """A digest of the files' contents (names included): what a cache key needs."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_files(folder: str) -> list[Path]:
    root = Path(folder)
    names = [*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt", "vocab.json", "added_tokens.json"]
    return [root / n for n in dict.fromkeys(names) if (root / n).is_file()]
