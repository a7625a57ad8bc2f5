"""The simulated engine keeps a step's freed memory mapped for the next step (glibc)."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from localsgd.engines.simulated import stacked
from localsgd.engines.simulated.engine import retain_freed_memory


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2") else None


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")
def test_megabyte_tensors_come_from_the_heap_once_retained(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(stacked, "_retained", [])
    libc = _glibc()
    assert libc is not None
    libc.mallinfo2.restype = MallInfo2
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # once per process
    mapped = libc.mallinfo2().hblkhd
    t = torch.empty(4 << 20, dtype=torch.uint8)  # 4 MiB: above glibc's default 128 KiB
    # Served from the heap, not by a fresh mmap, so freeing it leaves its pages mapped.
    assert libc.mallinfo2().hblkhd - mapped < 4 << 20
    del t


def test_a_process_that_chose_its_allocator_settings_is_left_alone(monkeypatch):
    monkeypatch.setattr(stacked, "_retained", [])
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert retain_freed_memory() is False
    monkeypatch.setattr(stacked, "_retained", [])
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert retain_freed_memory() is False
