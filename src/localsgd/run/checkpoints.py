"""Mid-run checkpoints: what every rank needs to continue its run exactly where it was.

::

    RUN_DIR/checkpoints/step<S>-rank<R>.pt   one file per rank, written atomically
    RUN_DIR/checkpoints/latest.json          the last complete checkpoint: its step, world
                                             size, run and every rank file's size and SHA-256
    RUN_DIR/checkpoints/previous.json        the same for the checkpoint before it

Two generations are kept. At a checkpoint step every rank first deletes its files older
than the last checkpoint, then writes its file; after a barrier (every file is complete)
rank 0 moves the last checkpoint's description to ``previous.json`` and names the new step
in ``latest.json``, each atomically. So a run killed at any moment finds a complete
checkpoint, all of one step, and disk use stays at two files per rank.

Resuming checks the latest checkpoint before trusting it: ``latest.json`` must parse, every
rank's file must exist with the size and SHA-256 it names, and this rank's file must load.
When it fails (a truncated or corrupt file, a missing rank, a garbled ``latest.json``) the
previous checkpoint is taken instead, and a warning line names the bad file and the step
resumed from; when neither is good the run starts again from step 0, also with a warning.
Every rank reads the same files and so makes the same choice.

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
import hashlib
import json
import logging
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
from localsgd.util.files import save_torch, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = 1
"""The layout of a checkpoint file; another one is refused."""
PREVIOUS = "previous.json"
"""In ``checkpoints/``: the checkpoint before the latest, resumed from when that is bad."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: the message names the file and what to do."""


class _Bad(Exception):
    """A checkpoint generation that is not whole (the message names the file): fall back."""


def _advice(folder: Path) -> str:
    return f"delete {folder} to start the run again from step 0"


_WARNED: set[str] = set()


def _warn(message: str) -> None:
    """A warning line, once per process (a run trained here is checked before it starts,
    then resumed: one line, not two)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        step = data["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"step must be a positive integer, got {step!r}")
        if not isinstance(data.get("world_size"), int):
            raise ValueError("world_size is missing")
        if not isinstance(data.get("files", {}), dict):
            raise ValueError("files must be an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise _Bad(f"{path} is unreadable ({exc})") from None
    return dict(data)


def read_latest(folder: Path) -> dict[str, Any] | None:
    """``latest.json`` of a run's checkpoint folder (None when there is no checkpoint);
    :class:`CheckpointError` when it is unreadable."""
    path = folder / LATEST
    if not path.is_file():
        return None
    try:
        return _manifest(path)
    except _Bad as bad:
        raise CheckpointError(f"{bad}; {_advice(folder)}") from None


def rank_file(folder: Path, step: int, rank: int) -> Path:
    return folder / f"step{step}-rank{rank}.pt"


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def _read(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise _Bad(f"checkpoint {path} is missing") from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise _Bad(f"checkpoint {path} is unreadable ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise _Bad(f"checkpoint {path} is not a localsgd checkpoint of format {FORMAT}")
    return state


def load_file(path: Path, folder: Path) -> dict[str, Any]:
    """One rank's checkpoint, read with ``weights_only=True``."""
    try:
        return _read(path)
    except _Bad as bad:
        raise CheckpointError(f"{bad}; {_advice(folder)}") from None


def _check(folder: Path, manifest: Mapping[str, Any], run_id: str, rank: int | None) -> dict[str, Any] | None:
    """Check a generation: every rank's file present with the size and SHA-256 the
    manifest names; then this ``rank``'s file loaded (returned), or every rank's (None).
    ``_Bad`` naming the file when it is not whole; :class:`CheckpointError` when it is
    another run's."""
    step, world = int(manifest["step"]), int(manifest["world_size"])
    files = manifest.get("files", {})
    for r in range(world):
        path = rank_file(folder, step, r)
        if not path.is_file():
            raise _Bad(f"checkpoint {path} is missing")
        expected = files.get(path.name)
        if isinstance(expected, dict):
            got = _digest(path)
            if got["bytes"] != expected.get("bytes"):
                raise _Bad(
                    f"checkpoint {path} is truncated ({got['bytes']} of {expected.get('bytes')} bytes)"
                )
            if got["sha256"] != expected.get("sha256"):
                raise _Bad(f"checkpoint {path} is corrupt (its SHA-256 is not the one {LATEST} recorded)")
    state = None
    for r in range(world) if rank is None else (rank,):
        path = rank_file(folder, step, r)
        state = _read(path)
        if state.get("run_id") != run_id or state.get("rank") != r or state.get("step") != step:
            raise CheckpointError(
                f"checkpoint {path} belongs to run {state.get('run_id')!r} (rank {state.get('rank')}, "
                f"step {state.get('step')}), not to run {run_id!r}; {_advice(folder)}"
            )
    return state if rank is not None else None


def choose(
    folder: Path, run_id: str, world_size: int | None = None, rank: int | None = None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """The checkpoint to resume from: (its manifest, ``rank``'s state when a rank is given,
    warnings). The latest when it is whole, else the previous one; (None, None, warnings)
    when neither is (or there is no checkpoint). :class:`CheckpointError` for a checkpoint
    of another run or of another number of worker processes (``world_size``)."""
    if not (folder / LATEST).is_file():
        return None, None, []
    problems: list[str] = []
    for name in (LATEST, PREVIOUS):
        path = folder / name
        if name == PREVIOUS and not path.is_file():
            break
        try:
            manifest = _manifest(path)
            if world_size is not None and manifest["world_size"] != world_size:
                raise CheckpointError(
                    f"{path} was written by {manifest['world_size']} worker process(es), "
                    f"and this run has {world_size}; {_advice(folder)}"
                )
            state = _check(folder, manifest, run_id, rank)
        except _Bad as bad:
            problems.append(str(bad))
            continue
        warnings = []
        if problems:
            warnings.append(
                f"{problems[0]}; resuming from the previous checkpoint, of step {manifest['step']}"
            )
        return manifest, state, warnings
    again = "no good checkpoint is left: the run starts again from step 0"
    return None, None, [f"{'; '.join(problems)}; {again}"]


def verify(run_dir: Path, run_id: str) -> int | None:
    """The step ``run_dir``'s run resumes from (None: from step 0): its latest checkpoint
    when every rank's file is whole and belongs to this run, else the previous one (a
    warning line says which file is bad and where the run resumes). Raises
    :class:`CheckpointError` naming the file for a checkpoint of another run."""
    manifest, _, warnings = choose(Path(run_dir) / CHECKPOINTS, run_id)
    for warning in warnings:
        _warn(warning)
    return None if manifest is None else int(manifest["step"])


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
        self.manifest: dict[str, Any] | None = None
        """That checkpoint's description (``latest.json``), which becomes ``previous.json``."""

    def load(self) -> dict[str, Any] | None:
        """This rank's state at the last good checkpoint (None when there is none)."""
        if self.folder is None:
            return None
        manifest, state, warnings = choose(self.folder, self.run_id, self.world_size, self.rank)
        if self.rank == 0:
            for warning in warnings:
                _warn(warning)
        if manifest is None or state is None:
            return None
        self.manifest = manifest
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
        # Two generations at most: the one before the last goes before this one is written.
        keep = rank_file(self.folder, self.last, self.rank).name
        for old in self.folder.glob(f"step*-rank{self.rank}.pt"):
            if old.name != keep:
                with contextlib.suppress(OSError):
                    old.unlink()
        payload = {"format": FORMAT, "run_id": self.run_id, "rank": self.rank, **state}
        save_torch(payload, rank_file(self.folder, step, self.rank))
        barrier()  # every rank's file is complete before latest.json names the step
        if self.rank == 0:
            files = {
                rank_file(self.folder, step, r).name: _digest(rank_file(self.folder, step, r))
                for r in range(self.world_size)
            }
            manifest = {"step": step, "world_size": self.world_size, "run_id": self.run_id, "files": files}
            if self.manifest is not None:
                write_json_atomic(self.folder / PREVIOUS, self.manifest)
            else:
                (self.folder / PREVIOUS).unlink(missing_ok=True)
            write_json_atomic(self.folder / LATEST, manifest)
            self.manifest = manifest
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
