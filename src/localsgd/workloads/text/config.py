"""The ``[workload]`` sections of the text workloads: frozen dataclasses, no transformers.

Every path is checked when the config is built, so a run with a missing model, tokenizer or
data file fails before any run record exists, with the dotted key named. Relative paths are
relative to the current directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from localsgd.util.checks import ConfigError, check_choice, check_float, check_int
from localsgd.workloads.base import VALIDATION_FRACTION, check_validation_fraction

MAX_LENGTH_CAP = 1 << 16
"""No sequence length above this (positions embeddings of real models stop far below)."""


def _check_dir(key: str, value: object, must_hold: tuple[str, ...] = (), what: str = "") -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a folder path, got {value!r}")
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"{key} '{value}' {'is not a folder' if path.exists() else 'does not exist'}")
    if must_hold and not any((path / name).is_file() for name in must_hold):
        raise ConfigError(f"{key} '{value}' holds no {' or '.join(must_hold)}: not {what}")
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


@dataclass(frozen=True)
class ModelConfig:
    """``[workload.model]``: the transformers model, from local files only.

    Give ``path`` (a checkpoint folder for ``from_pretrained``: fine-tuning, continued
    pretraining) or ``config`` (random initialisation: a table such as ``{model_type =
    "bert", hidden_size = 32, ...}``, or the path of a ``config.json`` or of a folder
    holding one).
    """

    path: str | None = None
    """A local checkpoint folder (``config.json`` and weights)."""
    config: dict[str, Any] | str | None = None
    """A transformers config for a randomly initialised model: a table with ``model_type``
    and the config's fields, or a path to a ``config.json`` (or its folder)."""
    tokenizer: str | None = None
    """A local tokenizer folder (default: ``path``)."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise ConfigError(
                "workload.model needs exactly one of path (a checkpoint folder) or config "
                "(a transformers config table or config.json path)"
            )
        if self.path is not None:
            _check_dir("workload.model.path", self.path, ("config.json",), "a transformers checkpoint")
        if isinstance(self.config, dict):
            if not isinstance(self.config.get("model_type"), str):
                raise ConfigError(
                    f'workload.model.config needs model_type (e.g. "bert"), got keys {sorted(self.config)}'
                )
        elif isinstance(self.config, str):
            p = Path(self.config)
            if not (p / "config.json" if p.is_dir() else p).is_file():
                raise ConfigError(
                    f"workload.model.config '{self.config}' is neither a config.json file nor a "
                    "folder holding one"
                )
        tokenizer = self.tokenizer if self.tokenizer is not None else self.path
        if tokenizer is None:
            raise ConfigError("workload.model.tokenizer is required with workload.model.config")
        _check_dir(
            "workload.model.tokenizer" if self.tokenizer is not None else "workload.model.path",
            tokenizer,
            TOKENIZER_FILES,
            "a tokenizer folder",
        )

    @property
    def tokenizer_path(self) -> str:
        path = self.tokenizer if self.tokenizer is not None else self.path
        assert path is not None
        return path


@dataclass(frozen=True)
class DataOptions:
    """What every text workload reads: where, how much, how long."""

    FILES: ClassVar[tuple[tuple[str, ...], ...]] = ()
    """Per required file, the names it may have inside ``path`` (the first found is read)."""
    LOCATIONS: ClassVar[tuple[str, ...]] = ("cache", "path")
    """Fields that say where files are, not what they hold: left out of the cache key (the
    files' contents key it)."""

    path: str
    """The data folder (or file, where the workload says so)."""
    train_subset: int | None = None
    """Train on the first N training examples after a shuffle seeded by ``subset_seed``
    (the 4K / 40K subsets of the fine-tuning studies); None: all of them."""
    eval_subset: int | None = None
    """Evaluate on the first N examples of each evaluation set (in file order); None: all."""
    subset_seed: int = 0
    """The seed of the subset shuffle (the same for every run, whatever its own seed)."""
    max_length: int = 128
    """Tokens per sequence (longer inputs are truncated; SQuAD contexts are split)."""
    cache: str | None = None
    """Where tokenised data is cached (default: ``~/.cache/localsgd/text``)."""

    def __post_init__(self) -> None:
        if self.train_subset is not None:
            check_int("workload.data.train_subset", self.train_subset, 1)
        if self.eval_subset is not None:
            check_int("workload.data.eval_subset", self.eval_subset, 1)
        check_int("workload.data.subset_seed", self.subset_seed, 0, 2**32 - 1)
        check_int("workload.data.max_length", self.max_length, 8, MAX_LENGTH_CAP)
        if self.cache is not None:
            p = Path(self.cache)
            if p.exists() and not p.is_dir():
                raise ConfigError(f"workload.data.cache '{self.cache}' is a file; it must be a folder")
        self.check_files()

    def check_files(self) -> None:
        folder = _check_dir("workload.data.path", self.path)
        for names in self.FILES:
            if not any((folder / n).is_file() for n in names):
                raise ConfigError(f"workload.data.path '{self.path}' holds no {' or '.join(names)}")

    def file(self, names: tuple[str, ...]) -> Path:
        """The first of ``names`` present in the data folder."""
        for name in names:
            if (Path(self.path) / name).is_file():
                return Path(self.path) / name
        raise ConfigError(f"workload.data.path '{self.path}' holds no {' or '.join(names)}")


MNLI_TRAIN = ("train.tsv", "train.jsonl")
MNLI_MATCHED = ("dev_matched.tsv", "dev_matched.jsonl")
MNLI_MISMATCHED = ("dev_mismatched.tsv", "dev_mismatched.jsonl")


@dataclass(frozen=True)
class MnliData(DataOptions):
    """``[workload.data]`` of ``mnli``: a folder with GLUE's ``train.tsv``,
    ``dev_matched.tsv`` and ``dev_mismatched.tsv`` (or ``.jsonl`` files of the same names
    with ``premise``, ``hypothesis``, ``label``)."""

    FILES: ClassVar[tuple[tuple[str, ...], ...]] = (MNLI_TRAIN, MNLI_MATCHED, MNLI_MISMATCHED)


SQUAD_TRAIN = ("train-v1.1.json",)
SQUAD_DEV = ("dev-v1.1.json",)


@dataclass(frozen=True)
class SquadData(DataOptions):
    """``[workload.data]`` of ``squad``: a folder with ``train-v1.1.json`` and
    ``dev-v1.1.json`` (SQuAD v1.1)."""

    FILES: ClassVar[tuple[tuple[str, ...], ...]] = (SQUAD_TRAIN, SQUAD_DEV)

    max_length: int = 384
    """Tokens per feature (question + context window), as the HF QA examples."""
    doc_stride: int = 128
    """Overlap of consecutive context windows of a long context (tokens)."""
    max_answer_length: int = 30
    """The longest answer span (tokens) evaluation may predict."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("workload.data.doc_stride", self.doc_stride, 1)
        if self.doc_stride >= self.max_length:
            raise ConfigError(
                f"workload.data.doc_stride must be < workload.data.max_length = {self.max_length}, "
                f"got {self.doc_stride}"
            )
        check_int("workload.data.max_answer_length", self.max_answer_length, 1)


@dataclass(frozen=True)
class MlmData(DataOptions):
    """``[workload.data]`` of ``mlm``: plain text, a ``.txt`` file or a folder of them."""

    eval_path: str | None = None
    """Held-out text (a file or folder); None: the last ``eval_fraction`` of the documents
    after the subset shuffle."""
    eval_fraction: float = 0.05
    """The share of documents held out when there is no ``eval_path``."""
    document: str = "line"
    """``line``: every non-empty line is a document; ``file``: every file is one."""
    mlm_probability: float = 0.15
    """The share of tokens chosen for prediction (80 % masked, 10 % random, 10 % kept)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("workload.data.eval_fraction", self.eval_fraction, 0.0, 1.0, low_open=True)
        check_choice("workload.data.document", self.document, ("line", "file"))
        check_float("workload.data.mlm_probability", self.mlm_probability, 0.0, 1.0, low_open=True)

    def check_files(self) -> None:
        for key, value in (("workload.data.path", self.path), ("workload.data.eval_path", self.eval_path)):
            if value is not None and not text_files(value):
                p = Path(value)
                why = "does not exist" if not p.exists() else "holds no .txt file"
                raise ConfigError(f"{key} '{value}' {why}")


CLASSIFICATION_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
"""File name endings and the format each is read in (``format`` overrides them)."""
TEXT_FIELDS = ("text", "sentence")
"""The text column looked for, in order, when ``text_field`` is not given."""


@dataclass(frozen=True)
class ClassificationData(DataOptions):
    """``[workload.data]`` of ``classification``: a training and a test file of single
    texts with a label each, as TSV or CSV with a header row, or JSON lines (one object a
    line). GLUE's SST-2 folder reads as ``path = "data/SST-2"``, ``test_file = "dev.tsv"``."""

    LOCATIONS: ClassVar[tuple[str, ...]] = ("cache", "path", "train_file", "test_file")

    path: str | None = None  # type: ignore[assignment]
    """A folder the file names are relative to; None: they are paths themselves (relative
    to the current directory)."""
    train_file: str = "train.tsv"
    """The training examples (the validation split is held out of them)."""
    test_file: str = "test.tsv"
    """The examples evaluated as the test split."""
    format: str | None = None
    """``tsv``, ``csv`` or ``jsonl``; None: from each file's ending (``.tsv``, ``.csv``,
    ``.jsonl`` or ``.ndjson``)."""
    text_field: str | None = None
    """The column (field) holding the text; None: the first of ``text``, ``sentence``."""
    label_field: str = "label"
    """The column (field) holding the label: a name or an integer."""
    labels: tuple[str, ...] | None = None
    """The label names in the order of their ids; None: the distinct labels of the training
    file, sorted (numerically when every one is an integer)."""

    def __post_init__(self) -> None:
        if self.format is not None:
            check_choice("workload.data.format", self.format, tuple(sorted(set(CLASSIFICATION_FORMATS.values()))))
        for key in ("text_field", "label_field"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"workload.data.{key} must be a non-empty column name, got {value!r}")
        if self.labels is not None:
            if len(self.labels) < 2 or any(not name for name in self.labels):
                raise ConfigError(
                    f"workload.data.labels must list at least two non-empty label names, got {list(self.labels)}"
                )
            if len(set(self.labels)) != len(self.labels):
                raise ConfigError(f"workload.data.labels names a label twice: {list(self.labels)}")
        super().__post_init__()

    def check_files(self) -> None:
        if self.path is not None:
            _check_dir("workload.data.path", self.path)
        for key in ("train_file", "test_file"):
            file = self.file_of(key)
            if not file.is_file():
                why = "is a folder" if file.is_dir() else "does not exist"
                raise ConfigError(f"workload.data.{key} '{file}' {why}")
            self.format_of(key)

    def file_of(self, key: str) -> Path:
        """The path of ``train_file`` or ``test_file``."""
        name = getattr(self, key)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"workload.data.{key} must be a file path, got {name!r}")
        return Path(self.path) / name if self.path is not None else Path(name)

    def format_of(self, key: str) -> str:
        """The format ``train_file`` or ``test_file`` is read in."""
        if self.format is not None:
            return self.format
        file = self.file_of(key)
        fmt = CLASSIFICATION_FORMATS.get(file.suffix.lower())
        if fmt is None:
            raise ConfigError(
                f"workload.data.{key} '{file}': the format of a '{file.suffix}' file is unknown; name "
                f"the file {', '.join(CLASSIFICATION_FORMATS)} or set workload.data.format to "
                f"{' or '.join(sorted(set(CLASSIFICATION_FORMATS.values())))}"
            )
        return fmt


def text_files(path: str) -> list[Path]:
    """``path`` itself if it is a file, else the ``.txt`` files under it, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*.txt") if f.is_file()) if p.is_dir() else []


@dataclass(frozen=True)
class TextConfig:
    """What the text workloads share at the top of their section."""

    eval_batch_size: int = 64
    """Sequences per forward pass in evaluation."""
    validation_fraction: float = VALIDATION_FRACTION
    """The share of the training examples held out as the validation split (never trained
    on; drawn from the number of examples alone, the same for every run of a study); 0:
    none. SQuAD holds out questions, with all of their context windows."""

    def __post_init__(self) -> None:
        check_int("workload.eval_batch_size", self.eval_batch_size, 1)
        fraction = check_validation_fraction("workload.validation_fraction", self.validation_fraction)
        object.__setattr__(self, "validation_fraction", fraction)


@dataclass(frozen=True)
class MnliConfig(TextConfig):
    """``[workload]`` of ``mnli``: sentence-pair classification (entailment, neutral,
    contradiction)."""

    model: ModelConfig = field(default_factory=lambda: _required("model"))
    """``[workload.model]``."""
    data: MnliData = field(default_factory=lambda: _required("data"))
    """``[workload.data]``."""


@dataclass(frozen=True)
class SquadConfig(TextConfig):
    """``[workload]`` of ``squad``: extractive question answering (SQuAD v1.1)."""

    model: ModelConfig = field(default_factory=lambda: _required("model"))
    data: SquadData = field(default_factory=lambda: _required("data"))


@dataclass(frozen=True)
class MlmConfig(TextConfig):
    """``[workload]`` of ``mlm``: masked-LM (continued) pretraining on plain text."""

    model: ModelConfig = field(default_factory=lambda: _required("model"))
    data: MlmData = field(default_factory=lambda: _required("data"))


@dataclass(frozen=True)
class ClassificationConfig(TextConfig):
    """``[workload]`` of ``classification``: single-text classification (sentiment, topic,
    acceptability: GLUE's SST-2 and CoLA, say)."""

    model: ModelConfig = field(default_factory=lambda: _required("model"))
    data: ClassificationData = field(default_factory=lambda: _required("data"))


def _required(key: str) -> Any:
    raise ConfigError(f"missing key 'workload.{key}': the text workloads need [workload.{key}]")
