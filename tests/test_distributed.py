"""Process-group set-up and import weight."""

from __future__ import annotations

import subprocess
import sys

import pytest

import localsgd


def test_init_distributed_without_torchrun_is_a_world_of_one(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info = localsgd.init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"incomplete torch.distributed environment"):
        localsgd.init_distributed()
    with pytest.raises(ValueError, match="backend must be 'gloo', 'nccl' or None"):
        localsgd.init_distributed(backend="mpi")


def test_import_is_light():
    code = "import sys, localsgd; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
