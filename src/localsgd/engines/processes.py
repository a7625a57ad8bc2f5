"""The process engine: K worker processes through torch's elastic launcher (torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from localsgd.studies.store import Store, write_json_atomic


def execute(config: Any, store: Store, *, timeout: float | None = None) -> str:
    """Run ``config`` to the end and record it in ``store``; returns the final status.

    One worker, or K simulated replicas, train in this process (no process group). K > 1
    worker processes are started with
    ``python -m torch.distributed.run --standalone --nproc-per-node K -m localsgd.worker``;
    their output goes to ``workers.log`` in the run folder.
    """
    run_id = config.run_id()
    folder = store.begin(run_id, config.name, config.to_dict())
    error = None
    if config.workers == 1 or config.engine == "simulated":
        from localsgd.studies.trainer import train

        try:
            train(config, folder, 0, 1)
        except Exception:  # recorded as failed; the study goes on
            error = traceback.format_exc()
        return store.finish(run_id, error=error)

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(config.workers),
        "-m",
        "localsgd.worker",
        str(folder / "config.json"),
        "--run-dir",
        str(folder),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(config.threads))
    write_json_atomic(folder / "launch.json", {"command": command})
    log_path = folder / "workers.log"
    try:
        with log_path.open("w") as log:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        if proc.returncode != 0:
            error = f"workers exited with code {proc.returncode}; last lines of workers.log:\n" + _tail(
                log_path
            )
    except subprocess.TimeoutExpired:
        error = f"workers did not finish within {timeout} s; last lines of workers.log:\n" + _tail(log_path)
    return store.finish(run_id, error=error)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
