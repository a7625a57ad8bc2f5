"""The run record: typed, versioned files in a run's folder.

::

    config.json     ConfigSnapshot: the resolved run config and the run id
    env.json        Environment: versions, git SHA, host, command, world
    metrics.jsonl   MetricsRow, one per evaluation of the consensus model
    status.json     Status: completed | failed (with the root error) | diverged, totals,
                    the workload's declared metrics, the engine that ran it

Every file carries :data:`RECORD_VERSION`; a reader refuses any other version with a
:class:`RecordError` naming the file. The trainer writes records through
:class:`RunWriter`; the report reads them through :class:`~localsgd.records.store.Store`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import traceback as tb
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from localsgd.records.group import GroupWrite
from localsgd.util.checks import ConfigError, from_dict
from localsgd.util.files import DiskFull, no_space, write_atomic, write_json_atomic

RECORD_VERSION = 3
"""Version 3: a validation split held out of the training data (``validation`` per row, the
splits named in the status) and warmups that only rise (``schedule`` in the status); runs of
version 2 trained on every training example and may have warmed up downwards. Version 2:
declared metrics (``metrics`` per row), structured errors, engine info."""

SPLITS = ("validation", "test")
"""What a selection (a target, an early stop, a search's best trial) may read: the
held-out validation split (the default) or the test split."""

STATUSES = ("completed", "failed", "diverged")

T = TypeVar("T")


class RecordError(ValueError):
    """A record file that cannot be read: missing, corrupt, or of another version."""


class RecordVersionError(RecordError):
    """A record written by another version of the record format."""


@dataclass(frozen=True)
class Metric:
    """One number a workload's evaluation reports about the consensus model."""

    name: str
    """The key in the workload's ``evaluate()`` result, e.g. ``"accuracy"``; an identifier."""
    label: str = ""
    """For humans, e.g. ``"test accuracy"`` (default: the name with spaces)."""
    unit: str = ""
    """The unit of the displayed value, e.g. ``"%"``."""
    higher_is_better: bool = True
    """The direction: accuracy, F1 and R² go up; losses and perplexity go down."""
    scale: float = 1.0
    """Displayed value = value × scale (accuracy is a fraction shown in percent: 100)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"metric name must be an identifier, got {self.name!r}")
        if self.name in RESERVED_METRIC_NAMES:
            raise ValueError(
                f"metric name {self.name!r} is reserved for a column of every metrics row; "
                f"not one of {sorted(RESERVED_METRIC_NAMES)}"
            )

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ")

    @property
    def heading(self) -> str:
        """``"test accuracy (%)"``: the title with its unit."""
        return f"{self.title} ({self.unit})" if self.unit else self.title

    def show(self, value: float | None) -> str:
        """A value as displayed: ``"97.45%"`` (4 significant digits; ``"n/a"`` for None)."""
        if value is None or not math.isfinite(value):
            return "n/a"
        return f"{value * self.scale:.4g}{self.unit}"

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def best(self, values: Sequence[float | None]) -> float:
        """The best finite value (NaN when there is none)."""
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return math.nan
        return max(finite) if self.higher_is_better else min(finite)

    def reached(self, value: float, target: float) -> bool:
        """Whether ``value`` is at or past ``target`` in the metric's direction."""
        return value >= target if self.higher_is_better else value <= target

    def crossed(self, value: float, target: float) -> bool:
        """Whether ``value`` is strictly past ``target`` in the metric's direction: the
        crossing of Shallue et al.'s steps-to-result (google-research ``batch_science``,
        ``measurement_utils``), which a value equal to the target does not make."""
        return value > target if self.higher_is_better else value < target


RESERVED_METRIC_NAMES = frozenset(
    {
        "step",
        "epoch",
        "samples",
        "wall_seconds",
        "lr",
        "train_loss",
        "metrics",
        "bytes",
        "syncs",
        "collectives",
        "comm_seconds",
        "by_scope",
        "run_id",
        "updates",
        "updates_per_second",
    }
)
"""Columns every metrics row has: no workload metric may take one of these names."""


@dataclass(frozen=True)
class ErrorInfo:
    """Why a run failed: the root exception, as the worker that raised it saw it."""

    type: str
    message: str
    traceback: str = ""
    rank: int | None = None
    """The worker (rank) that raised it first; None when it was raised outside a worker."""

    @classmethod
    def from_exception(cls, exc: BaseException, rank: int | None = None) -> ErrorInfo:
        text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__)).strip()
        return cls(type(exc).__name__, str(exc), text, rank)

    def line(self) -> str:
        """One line: ``ValueError: message (rank 1)``."""
        first = (self.message.strip().splitlines() or [""])[0]
        where = f" (rank {self.rank})" if self.rank is not None else ""
        return f"{self.type}: {first}{where}"


@dataclass(frozen=True)
class EngineInfo:
    """What an engine's figures mean, recorded with each run for the report."""

    name: str
    real_wall_time: bool = True
    """True: a run's wall time is the time its K workers took, running at once. False: the
    K workers were computed by one process (a simulation): its wall time measures the
    simulation, and estimates take one worker's compute time from elsewhere."""
    description: str = ""


@dataclass(frozen=True)
class ConfigSnapshot:
    """``config.json``: the resolved run config (``RunConfig.to_dict()``) and its id."""

    version: int
    run_id: str
    config: dict[str, Any]


@dataclass(frozen=True)
class Environment:
    """``env.json``: where and with what a run ran."""

    version: int
    python: str
    torch: str
    numpy: str
    localsgd: str
    git_sha: str | None
    host: str
    platform: str
    cpu_count: int | None
    command: tuple[str, ...]
    world_size: int
    backend: str | None
    device: str
    cuda: str | None
    started_at: str


@dataclass(frozen=True)
class MetricsRow:
    """One line of ``metrics.jsonl``: the consensus model evaluated at ``step``."""

    step: int
    epoch: float
    samples: int
    """Training samples consumed by all workers together."""
    wall_seconds: float
    """Training wall time so far (evaluation excluded)."""
    lr: float | None
    train_loss: float | None
    """Mean training loss over workers since the previous evaluation (None at step 0)."""
    metrics: dict[str, float | None]
    """The workload's declared metrics of the consensus model on the test split."""
    validation: dict[str, float | None] = field(default_factory=dict)
    """The same metrics on the validation split held out of the training data (empty when
    the workload holds none out)."""
    bytes: int = 0
    syncs: int = 0
    collectives: int = 0
    comm_seconds: float = 0.0
    by_scope: dict[str, dict[str, float]] = field(default_factory=dict)
    """Cumulative communication per scope (``world``, ``block2``, ``push``, ``pull``, ...)."""
    updates: int | None = None
    """Updates the evaluated model has received so far: steps for synchronous algorithms
    (one update of every replica per step), every worker's step under Hogwild (all write
    the shared model), the server's updates under a parameter server."""
    updates_per_second: float | None = None
    """``updates`` / ``wall_seconds``."""


@dataclass(frozen=True)
class Counters:
    """A run's final communication counters (they include the averaging on exit)."""

    steps: int = 0
    syncs: int = 0
    collectives: int = 0
    bytes: int = 0
    comm_seconds: float = 0.0
    by_scope: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    """``status.json``: how a run ended, with its totals and what its figures mean."""

    version: int
    status: str
    """``completed``, ``failed`` or ``diverged``."""
    error: ErrorInfo | None = None
    steps: int = 0
    epochs: float = 0.0
    samples: int = 0
    wall_seconds: float = 0.0
    metrics: tuple[Metric, ...] = ()
    """The workload's declared metrics (empty when the run failed before building it)."""
    primary: str | None = None
    best: dict[str, float | None] = field(default_factory=dict)
    """The best value of each metric over the run's evaluations, in its direction."""
    final: MetricsRow | None = None
    counters: Counters | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    global_batch: int | None = None
    algorithm: dict[str, Any] | None = None
    """The algorithm config the run used, defaults filled in."""
    engine: EngineInfo | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """Engine-specific notes (the simulated engine: whether vmap was used, and why not)."""
    resumed: tuple[int, ...] = ()
    """The steps from which the run continued after an interruption (a mid-run checkpoint
    each), in order; empty for a run trained in one go. Its rows and totals are those of
    the uninterrupted run: the work lost after a checkpoint is redone and counted once."""
    splits: dict[str, str] = field(default_factory=dict)
    """Which data each metrics field of the rows was evaluated on: ``{"metrics": "test
    split (4000 examples)", "validation": "validation split: 1600 examples held out of the
    training data, never trained on"}`` (``validation`` says ``none`` when nothing was held
    out)."""
    best_validation: dict[str, float | None] = field(default_factory=dict)
    """The best value of each metric on the validation split over the run's evaluations."""
    schedule: dict[str, Any] = field(default_factory=dict)
    """The learning rate the run took: its peak, the warmup's steps and start rate, and a
    note saying what warmup was taken and why (none when the peak is not above the rate
    a warmup would start from)."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, got {self.status!r}")

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.wall_seconds if self.wall_seconds else None

    def metric(self, name: str | None = None) -> Metric | None:
        wanted = self.primary if name is None else name
        return next((m for m in self.metrics if m.name == wanted), None)


# -- JSON --------------------------------------------------------------------------------


def to_json(record: Any) -> dict[str, Any]:
    """A record dataclass as JSON-ready data (non-finite floats become None)."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        raise TypeError(f"to_json() takes a record dataclass instance, got {type(record).__name__}")
    return _plain(record)


def _plain(v: Any) -> Any:
    # What dataclasses.asdict gives, without its deep copy of every leaf (the same data:
    # a search writes thousands of rows and statuses).
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    names = _FIELDS.get(type(v))
    if names is None and dataclasses.is_dataclass(v) and not isinstance(v, type):
        names = _FIELDS[type(v)] = tuple(f.name for f in dataclasses.fields(v))
    if names is not None:
        return {name: _plain(getattr(v, name)) for name in names}
    return v


_FIELDS: dict[type, tuple[str, ...]] = {}


def from_json(cls: type[T], data: Any, where: str, *, versioned: bool = True) -> T:
    """``cls`` from parsed JSON; ``RecordError`` naming ``where`` for another version or a
    malformed file."""
    if versioned:
        version = data.get("version") if isinstance(data, Mapping) else None
        if version != RECORD_VERSION:
            raise RecordVersionError(
                f"{where}: record version {version!r} is not supported (this localsgd reads "
                f"version {RECORD_VERSION}); it was written by another localsgd version: rerun "
                "the study with this one, or report it with the version that wrote it"
            )
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise RecordError(f"{where} is malformed: {exc}") from None


def read_json(path: Path) -> Any:
    """A JSON file; ``RecordError`` naming the file when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path} is unreadable ({exc}); delete the run folder to redo the run") from None


def read_metrics(path: Path) -> list[MetricsRow]:
    """``metrics.jsonl``; a truncated last line (a run killed while writing) is ignored,
    any other bad line is a ``RecordError`` naming the file and line."""
    return read_metrics_stream(path)[0]


def read_metrics_stream(path: Path) -> tuple[list[MetricsRow], int | None]:
    """``metrics.jsonl``'s rows and the number of its last line when that line was cut off
    mid-write (not JSON; it is dropped), else None. Any other bad line is a
    ``RecordError`` naming the file and line."""
    if not path.exists():
        return [], None
    lines = path.read_text(errors="replace").splitlines()
    rows: list[MetricsRow] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                return rows, i  # cut off mid-write
            raise RecordError(f"{path}, line {i}: not JSON ({exc})") from None
        rows.append(from_json(MetricsRow, data, f"{path}, line {i}", versioned=False))
    return rows, None


class RunWriter:
    """Writes one run's record files into ``run_dir`` (rank 0 only; with ``run_dir`` None
    every call is a no-op, so other ranks can hold one too). A row that a full disk cuts
    off is taken back (the file is cut to the rows before it) and raises
    :class:`~localsgd.util.files.DiskFull`: ``metrics.jsonl`` holds whole rows only."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.rows: list[MetricsRow] = []
        self._file: IO[bytes] | None = None
        if run_dir is not None:
            self._open("wb")

    def _open(self, mode: str) -> None:
        assert self.run_dir is not None
        path = self.run_dir / "metrics.jsonl"
        try:
            # Unbuffered: a failed write leaves nothing pending that closing would retry.
            self._file = path.open(mode, buffering=0)
        except OSError as exc:
            if no_space(exc):
                raise DiskFull(path) from exc
            raise

    def restore(self, rows: Sequence[MetricsRow]) -> None:
        """Continue a run from a checkpoint: ``metrics.jsonl`` holds exactly ``rows`` (the
        ones written before the checkpoint; any written after it are dropped), and a status
        left by the interrupted attempt is removed."""
        self.rows = list(rows)
        if self.run_dir is None:
            return
        self.close()
        path = self.run_dir / "metrics.jsonl"
        write_atomic(path, "".join(json.dumps(to_json(row)) + "\n" for row in self.rows))
        (self.run_dir / "status.json").unlink(missing_ok=True)
        self._open("ab")

    def environment(self, env: Environment, group: GroupWrite | None = None) -> None:
        """``env.json``; with ``group``, added to it (written when the group commits)."""
        if self.run_dir is not None:
            self._json("env.json", to_json(env), group)

    def row(self, row: MetricsRow) -> None:
        if self._file is not None:
            data = (json.dumps(to_json(row)) + "\n").encode()
            start = self._file.seek(0, 2)
            try:
                view = memoryview(data)
                while view:
                    view = view[self._file.write(view) or 0 :]
            except OSError as exc:
                with contextlib.suppress(OSError):
                    self._file.truncate(start)
                if no_space(exc):
                    raise DiskFull(self._file.name) from exc
                raise
        self.rows.append(row)

    def status(self, status: Status, group: GroupWrite | None = None) -> None:
        """``status.json``; with ``group``, added to it (written when the group commits)."""
        if self.run_dir is not None:
            self._json("status.json", to_json(status), group)

    def _json(self, name: str, data: Any, group: GroupWrite | None) -> None:
        assert self.run_dir is not None
        if group is None:
            write_json_atomic(self.run_dir / name, data)
        else:
            group.add_json(self.run_dir / name, data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def failed_status(error: ErrorInfo, rows: list[MetricsRow] | None = None) -> Status:
    """The status of a run that failed, with what it got done."""
    last = rows[-1] if rows else None
    return Status(
        RECORD_VERSION,
        "failed",
        error=error,
        steps=last.step if last else 0,
        epochs=last.epoch if last else 0.0,
        samples=last.samples if last else 0,
        wall_seconds=last.wall_seconds if last else 0.0,
        final=last,
    )


def lost_workers(status: Status) -> dict[int, str]:
    """The workers an asynchronous run went on without, by rank, each with what is known of
    the loss: the server's version when it saw the worker's connection close
    (``details.server.lost_workers``) and how its process ended (``details.lost_ranks``,
    written by the launcher that kept the others running)."""
    details = status.details or {}
    server = details.get("server")
    if not isinstance(server, dict):
        server = {}
    versions = server.get("lost_workers") or {}
    ended = details.get("lost_ranks") or {}
    out: dict[int, str] = {}
    for key in sorted({*versions, *ended}, key=lambda k: int(k)):
        what = [f"at version {versions[key]}"] if key in versions else []
        what += [f"({ended[key]})"] if key in ended else []
        out[int(key)] = " ".join(what)
    return out


def lost_line(status: Status | None) -> str:
    """``"1 worker lost: rank 2 at version 812 (SIGKILL)"``, or '' when none was lost."""
    lost = lost_workers(status) if status is not None else {}
    if not lost:
        return ""
    each = ", ".join(f"rank {rank} {what}".rstrip() for rank, what in lost.items())
    return f"{len(lost)} worker{'s' if len(lost) > 1 else ''} lost: {each}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
