"""The launcher forks ``localsgd.worker`` (and link probe) workers from its own process; other programs start
as torchrun starts them, and a forked worker starts as a started one would. Checked in a
fresh interpreter: the launcher patches torch's launcher in its own process, which must not
leak into the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, multiprocessing, os, signal, sys
from localsgd.engines.launching import elastic
import torch
import torch.distributed.run as torchrun

def handling(sig):
    handler = signal.getsignal(sig)
    names = {signal.SIG_DFL: "default", signal.SIG_IGN: "ignored", signal.default_int_handler: "python"}
    return names.get(handler, "other")


WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
at_start = {int(sig): handling(sig) for sig in WATCHED}  # what this interpreter inherited
elastic.fork_workers()
elastic.fork_workers()  # a second call changes nothing
out = {"modules_before": "localsgd.run.worker" in sys.modules or "torch._dynamo" in sys.modules}
for name, program in {"probe": ["-m", "localsgd.emulation.probe", "out.json", "--sizes", "4096"],
                      "worker": ["-m", "localsgd.worker", "run.toml", "--run-dir", "d"],
                      "other": ["-m", "json.tool", "in.json"],
                      "missing": ["-m", "localsgd.no_such_module"]}.items():
    args = torchrun.parse_args(["--nnodes", "1", "--nproc-per-node", "2", *program])
    config, cmd, cmd_args = torchrun.config_from_args(args)
    out[name] = {
        "entry": cmd if isinstance(cmd, str) else f"{cmd.__module__}.{cmd.__qualname__}",
        "args": list(cmd_args),
        "start_method": config.start_method,
    }
    out[f"dynamo_after_{name}"] = "torch._dynamo" in sys.modules
out["preloaded"] = all(m in sys.modules for m in ("torch._dynamo", "localsgd.run.worker"))
out["executable"] = sys.executable

# What torch's agent does before it forks: its own signal handlers, a rank's variables.
for sig in WATCHED:
    signal.signal(sig, lambda *a: None)
out["at_start"] = at_start
torch.set_num_threads(2)
os.environ["OMP_NUM_THREADS"] = "1"
sys.stdout.write("buffered by the launcher, flushed before the fork\n")
child = multiprocessing.get_context("fork").Process(
    target=elastic.forked_worker, args=("probe_entry", "a", "--b")
)
child.start()
child.join()
out["exitcode"] = child.exitcode
print(json.dumps(out), flush=True)
"""

ENTRY = r"""
import json, os, signal, sys, torch

def handling(sig):
    handler = signal.getsignal(sig)
    names = {signal.SIG_DFL: "default", signal.SIG_IGN: "ignored", signal.default_int_handler: "python"}
    return names.get(handler, "other")


def forked_entry(*args):
    sys.stdout.write("from the worker\n")  # no flush: reaches the file at once, as with -u
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump({
            "args": list(args),
            "signals": {int(sig): handling(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)},
            "threads": torch.get_num_threads(),
            "stdout_seen": open(os.environ["PROBE_STDOUT"]).read(),
        }, f)
"""


def test_the_worker_module_is_forked_and_any_other_program_is_started(tmp_path: Path) -> None:
    (tmp_path / "probe_entry.py").write_text(ENTRY)
    stdout = tmp_path / "stdout.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "PROBE_OUT": str(tmp_path / "child.json"),
        "PROBE_STDOUT": str(stdout),
    }
    env.pop("PYTHONUNBUFFERED", None)
    with stdout.open("w") as sink:
        done = subprocess.run(
            [sys.executable, "-c", PROBE], stdout=sink, stderr=subprocess.PIPE, text=True, env=env, timeout=120
        )
    assert done.returncode == 0, done.stderr
    lines = stdout.read_text().splitlines()
    out = json.loads(lines[-1])
    # Nothing heavy at fork_workers(); the worker's module and torch._dynamo once a launch
    # of the worker is configured.
    assert out["modules_before"] is False and out["preloaded"] is True
    # What each program preloads is its own (FORK_PRELOAD): the probe trains nothing.
    assert out["dynamo_after_probe"] is False and out["dynamo_after_worker"] is True
    assert out["probe"] == {
        "entry": "localsgd.engines.launching.elastic.forked_worker",
        "args": ["localsgd.emulation.probe", "out.json", "--sizes", "4096"],
        "start_method": "fork",
    }
    assert out["worker"] == {
        "entry": "localsgd.engines.launching.elastic.forked_worker",
        "args": ["localsgd.worker", "run.toml", "--run-dir", "d"],
        "start_method": "fork",
    }
    assert out["other"] == {
        "entry": out["executable"],
        "args": ["-u", "-m", "json.tool", "in.json"],
        "start_method": "spawn",
    }
    # A module that cannot be imported is started, and its workers say so as python -m would.
    assert out["missing"] == {
        "entry": out["executable"],
        "args": ["-u", "-m", "localsgd.no_such_module"],
        "start_method": "spawn",
    }
    assert out["exitcode"] == 0
    child = json.loads((tmp_path / "child.json").read_text())
    # Each signal handled as the launcher's interpreter started (Python's SIGINT handler and
    # the default for the others, or ignored where it inherited that), not by the handlers
    # installed since.
    at_start = out["at_start"]
    assert set(at_start.values()) <= {"default", "ignored", "python"}
    assert child == {
        "args": ["a", "--b"],
        "signals": at_start,
        "threads": 1,  # OMP_NUM_THREADS, as a started worker reads it
        # The launcher's buffered line once (flushed before the fork, not copied into the
        # child's buffer), then the worker's own line the moment it was written.
        "stdout_seen": "buffered by the launcher, flushed before the fork\nfrom the worker\n",
    }
    assert lines[:2] == ["buffered by the launcher, flushed before the fork", "from the worker"]
