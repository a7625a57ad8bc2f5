"""A small harness for real multi-process tests: ranks forked from a preloaded server, a
free port, a timeout.

``run_world(fn, world_size, *args)`` starts ``world_size`` processes, each with
the caller's environment and working directory and torchrun's variables set (loopback, a
free port), calls
``localsgd.init_distributed()`` (gloo on CPU) and then ``fn(rank, world_size, *args)``.
Each rank's return value comes back through a file. A rank that raises fails the test with
its traceback; a world that does not finish within ``timeout`` seconds is killed and fails
the test instead of hanging CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import socket
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# torchrun's variables: a subprocess test clears them so an outer launcher cannot leak in.
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


# The run the fault tests interrupt in every way (a killed launch, a full disk, a killed
# worker...): each resumed copy must end as this run trained in one go (the session's
# ``uninterrupted_run`` fixture, trained once for all of them). Its workload is a table of
# its own, which the fault tests replace by workloads that fail on cue.
FAULT_TRAINING: dict[str, Any] = {
    "workers": 2,
    "device": "cpu",
    "algorithm": {"name": "local_sgd", "period": 2},
    "data": {"batch_size": 16},
    "train": {"epochs": 2, "max_steps": 40, "eval_every": 5, "checkpoint_every": 4},
}
FAULT_WORKLOAD: dict[str, Any] = {"name": "mnist1d_mlp", "num_samples": 1000}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Ranks are forked from one server process that has imported torch and localsgd once for the
# whole session: a spawned rank spends seconds importing torch, and the suite starts dozens
# of worlds. The server runs nothing of torch (no thread pools exist to be lost by a fork),
# and each rank still is its own process with its own process group. torch._dynamo
# is among the preloads: every optimizer's construction and step imports it (a second of
# CPU in each rank otherwise); importing it starts no thread.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "localsgd", "localsgd.run.training"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out: str,
    args: tuple,
    environ: dict[str, str] | None = None,
    cwd: str | None = None,
) -> None:
    # The server's environment and directory are those of the test that started it: a
    # rank takes its caller's instead, as a spawned process would.
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    if cwd is not None:
        os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    import localsgd

    try:
        localsgd.init_distributed(backend="gloo", timeout=60)
        result = fn(rank, world_size, *args)
        payload: dict[str, Any] = {"ok": True, "result": result}
    except BaseException:
        payload = {"ok": False, "error": traceback.format_exc()}
    # The result is saved before tearing down, so a crash in gloo's teardown loses nothing.
    with open(out, "wb") as f:
        pickle.dump(payload, f)
    localsgd.destroy_distributed()


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    may_die: tuple[int, ...] = (),
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; results by rank.
    Ranks in ``may_die`` may end without a result (a test that kills them): theirs is None."""
    ctx = _context()
    port = free_port()
    environ, cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pkl") for r in range(world_size)]
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, port, outs[r], args, environ, cwd))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout}s; killed")
        results = []
        for r, path in enumerate(outs):
            if r in may_die and not os.path.exists(path):
                results.append(None)
                continue
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} and no result")
            with open(path, "rb") as f:
                payload = pickle.load(f)
            if not payload["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results


def run_in_session(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    """Run ``cmd`` in a session of its own, so that a timeout kills a launcher *and* its
    workers (and fails the test); return its exit status, stdout and stderr."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} still running after {timeout}s; killed\n{out[-4000:]}\n{err[-4000:]}")
    return proc.returncode, out, err


def worker_command(nproc: int, config: str, *args: str) -> list[str]:
    """A hand-run ``torchrun --standalone --nproc-per-node N -m localsgd.worker CONFIG ...``."""
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [*launcher, "-m", "localsgd.worker", config, *args]


def untimed_rows(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics rows without the fields that measure time (they differ between two
    runs of the same config): what must be equal when two runs are."""
    import json

    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for timed in ("wall_seconds", "comm_seconds", "by_scope", "updates_per_second"):
            row.pop(timed, None)
        out.append(row)
    return out


def assert_same_run(run_dir: Path, reference: Path, steps: list[int]) -> None:
    """Two runs ended alike: the same final parameters, bit for bit, and the same untimed
    metrics rows, logged at ``steps``."""
    import torch

    got = torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["model"]
    expected = torch.load(Path(reference) / "checkpoint.pt", weights_only=True)["model"]
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert untimed_rows(run_dir) == untimed_rows(reference)
    assert [r["step"] for r in untimed_rows(run_dir)] == steps


def wait_until(
    done: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 200
) -> None:
    """Wait for an event (``done()`` true); fail at once if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"ended (code {proc.returncode}) before {what}:\n{out}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


def launch(
    command: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a launcher (``-m torch.distributed.run ...``, ``-m accelerate.commands.launch
    ...``) under this Python to its end: the launcher variables scrubbed,
    ``OMP_NUM_THREADS=1``, this tree's ``src/`` first on ``PYTHONPATH``, ``env`` on top, in
    a session of its own so that a timeout kills the launcher *and* its workers (and fails
    the test)."""
    import sys

    root = Path(__file__).resolve().parents[1]
    full = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    full.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(root / "src"), full.get("PYTHONPATH")])),
    )
    full.update(env or {})
    cmd = [sys.executable, *command]
    returncode, out, err = run_in_session(cmd, full, root, timeout)
    return subprocess.CompletedProcess(cmd, returncode, out, err)


def finished(proc: subprocess.CompletedProcess[str], results: list[Path]) -> bool:
    """Whether a launch did its work: it exited cleanly, or every rank had written its
    results file (whole, by rename) before a gloo process aborted in its interpreter's
    teardown (SIGABRT, which torchrun reports as a failed child)."""
    return proc.returncode == 0 or (all(f.is_file() for f in results) and "SIGABRT" in proc.stderr)
