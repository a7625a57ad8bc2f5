"""Mid-run checkpoints: what every rank needs to continue its run exactly where it was.

::

    RUN_DIR/checkpoints/step<S>-rank<R>.pt   one file per rank, written atomically
    RUN_DIR/checkpoints/latest.json          {"step": S, "world_size": W, "run_id": ...}

At a checkpoint step every rank writes its file; after a barrier (every file is complete)
rank 0 names the step in ``latest.json``, atomically, and deletes the older files. A run
killed at any moment therefore finds one complete checkpoint per rank, all of one step.

A rank's file holds its ``DataParallel`` state (this replica's parameters and buffers, the
algorithm's state, the step and communication counters), the optimizer's state, where
training stands (step, epoch, batches of that epoch consumed, training seconds, the loss
summed since the last evaluation), the RNG states (torch, CUDA, NumPy, Python), the metrics
rows written so far and the steps of earlier resumes. Continuing from it replays nothing
and skips nothing: the resumed run's parameters and rows are those of the uninterrupted run
(the data of the interrupted epoch is drawn again and the consumed batches skipped). Files
are read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, dicts.

Checkpoints are taken at the first step at or after every ``train.checkpoint_every`` steps
at which the algorithm synchronised (all replicas of a local-SGD group agree there). The
run folder must be one every rank can reach (one machine, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localsgd.records.record import MetricsRow, from_json, to_json
from localsgd.records.store import CHECKPOINTS, LATEST
from localsgd.util.checks import ConfigError
from localsgd.util.files import atomic_path, write_json_atomic

FORMAT = 1
"""The layout of a checkpoint file; another one is refused."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: the message names the file and what to do."""


def _advice(folder: Path) -> str:
    return f"delete {folder} to start the run again from step 0"


def read_latest(folder: Path) -> dict[str, Any] | None:
    """``latest.json`` of a run's checkpoint folder (None when there is no checkpoint)."""
    path = folder / LATEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        step = data["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"step must be a positive integer, got {step!r}")
        if not isinstance(data.get("world_size"), int):
            raise ValueError("world_size is missing")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); {_advice(folder)}") from None
    return dict(data)


def rank_file(folder: Path, step: int, rank: int) -> Path:
    return folder / f"step{step}-rank{rank}.pt"


def load_file(path: Path, folder: Path) -> dict[str, Any]:
    """One rank's checkpoint, read with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is missing; {_advice(folder)}") from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"{_advice(folder)}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a localsgd checkpoint of format {FORMAT}; {_advice(folder)}")
    return state


def verify(run_dir: Path, run_id: str) -> int | None:
    """Check that ``run_dir``'s last checkpoint can be resumed (every rank's file reads
    back and belongs to this run); returns its step (None: no checkpoint). Raises
    :class:`CheckpointError` naming the file otherwise."""
    folder = Path(run_dir) / CHECKPOINTS
    latest = read_latest(folder)
    if latest is None:
        return None
    step, world = int(latest["step"]), int(latest["world_size"])
    for rank in range(world):
        path = rank_file(folder, step, rank)
        state = load_file(path, folder)
        if state.get("run_id") != run_id or state.get("rank") != rank or state.get("step") != step:
            raise CheckpointError(
                f"checkpoint {path} belongs to run {state.get('run_id')!r} (rank {state.get('rank')}, "
                f"step {state.get('step')}), not to run {run_id!r}; {_advice(folder)}"
            )
    return step


def rng_state() -> dict[str, Any]:
    """The global random generators' states, as tensors, numbers and tuples."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


class Checkpoints:
    """One rank's checkpoints of a run (see the module docstring). ``folder``: the run's
    ``checkpoints/`` (None: this rank can neither save nor resume); ``every``:
    ``train.checkpoint_every`` (0: never save; an existing checkpoint is still resumed)."""

    def __init__(self, folder: Path | None, rank: int, world_size: int, every: int, run_id: str) -> None:
        self.folder = folder
        self.rank = rank
        self.world_size = world_size
        self.every = every
        self.run_id = run_id
        self.last = 0
        """The step of the latest checkpoint taken or resumed from."""

    def load(self) -> dict[str, Any] | None:
        """This rank's state at the last checkpoint (None when there is none)."""
        if self.folder is None:
            return None
        latest = read_latest(self.folder)
        if latest is None:
            return None
        if latest["world_size"] != self.world_size:
            raise CheckpointError(
                f"{self.folder / LATEST} was written by {latest['world_size']} worker process(es), "
                f"and this run has {self.world_size}; {_advice(self.folder)}"
            )
        path = rank_file(self.folder, int(latest["step"]), self.rank)
        state = load_file(path, self.folder)
        if state.get("run_id") != self.run_id or state.get("rank") != self.rank:
            raise CheckpointError(
                f"checkpoint {path} belongs to run {state.get('run_id')!r}, rank {state.get('rank')}; "
                f"{_advice(self.folder)}"
            )
        self.last = int(state["step"])
        return state

    def wanted(self, step: int) -> bool:
        """Whether a checkpoint is due once ``step`` is a sync step."""
        return self.folder is not None and self.every > 0 and step - self.last >= self.every

    def save(self, state: dict[str, Any], barrier: Callable[[], object]) -> None:
        """Write this rank's ``state`` (a checkpoint at ``state["step"]``); every rank calls
        it at the same step (``barrier`` is a collective)."""
        assert self.folder is not None
        step = int(state["step"])
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "run_id": self.run_id, "rank": self.rank, **state}
        with atomic_path(rank_file(self.folder, step, self.rank)) as tmp:
            torch.save(payload, tmp)
        barrier()  # every rank's file is complete before latest.json names the step
        if self.rank == 0:
            write_json_atomic(
                self.folder / LATEST, {"step": step, "world_size": self.world_size, "run_id": self.run_id}
            )
            for old in self.folder.glob("step*-rank*.pt"):
                if not old.name.startswith(f"step{step}-"):
                    with contextlib.suppress(OSError):
                        old.unlink()
        self.last = step


def rows_state(rows: list[MetricsRow]) -> list[dict[str, Any]]:
    return [to_json(row) for row in rows]


def rows_from_state(rows: list[dict[str, Any]], where: str) -> list[MetricsRow]:
    return [from_json(MetricsRow, row, where, versioned=False) for row in rows]


def remove(run_dir: Path) -> None:
    """Delete a run folder's checkpoints (the run starts again from step 0)."""
    import shutil

    shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(Path(run_dir) / CHECKPOINTS)
