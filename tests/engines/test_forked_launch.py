"""The launcher forks ``localsgd.worker`` workers from a fork server; other programs start
as torchrun starts them. Checked in a fresh interpreter: the launcher patches torch's
launcher in its own process, which must not leak into the test process."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, multiprocessing, sys
from multiprocessing import forkserver
from localsgd.engines.launching import elastic
import torch.distributed.run as torchrun

elastic.fork_workers()
elastic.fork_workers()  # a second call changes nothing
out = {}
for name, program in {"worker": ["-m", "localsgd.worker", "run.toml", "--run-dir", "d"],
                      "other": ["-m", "json.tool", "in.json"]}.items():
    args = torchrun.parse_args(["--nnodes", "1", "--nproc-per-node", "2", *program])
    config, cmd, cmd_args = torchrun.config_from_args(args)
    out[name] = {
        "entry": cmd if isinstance(cmd, str) else f"{cmd.__module__}.{cmd.__qualname__}",
        "args": list(cmd_args),
        "start_method": config.start_method,
    }
out["preload"] = forkserver._forkserver._preload_modules
out["executable"] = sys.executable
print(json.dumps(out))
"""


def test_the_worker_module_is_forked_and_any_other_program_is_started() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["worker"] == {
        "entry": "localsgd.run.worker.forked_entry",
        "args": ["run.toml", "--run-dir", "d"],
        "start_method": "forkserver",
    }
    assert out["other"] == {
        "entry": out["executable"],
        "args": ["-u", "-m", "json.tool", "in.json"],
        "start_method": "spawn",
    }
    assert out["preload"] == ["torch", "torch.distributed", "torch._dynamo", "localsgd.worker"]
