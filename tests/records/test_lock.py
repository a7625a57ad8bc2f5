"""Store locks: a study holds its store alone, single runs share it, a lock dies with its
process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from localsgd.records import Store
from localsgd.records.lock import FileLock, StoreInUse


def test_a_study_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    first = Store.lock_for_study(tmp_path).acquire()
    with pytest.raises(StoreInUse, match=rf"^store {tmp_path} is in use by PID {os.getpid()} \("):
        Store.lock_for_study(tmp_path).acquire()
    first.release()
    Store.lock_for_study(tmp_path).acquire().release()  # free again


def test_single_runs_share_a_store_but_not_a_run_and_never_beside_a_study(tmp_path):
    store = Store(tmp_path)
    with store.run_lock("aaa"), store.run_lock("bbb"):
        with pytest.raises(StoreInUse, match=rf"^run aaa in store {tmp_path} is in use by PID {os.getpid()}"):
            store.run_lock("aaa").__enter__()
        with pytest.raises(StoreInUse, match=rf"^store {tmp_path} is in use by PID {os.getpid()}"):
            Store.lock_for_study(tmp_path).acquire()
    with Store.lock_for_study(tmp_path), pytest.raises(StoreInUse, match="is in use by PID"):
        store.run_lock("aaa").__enter__()


def test_a_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from localsgd.records.lock import FileLock; "
            "FileLock(sys.argv[1], 'x').acquire(); print('held', flush=True); time.sleep(600)",
            str(tmp_path / "lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreInUse, match=f"in use by PID {holder.pid} "):
            FileLock(tmp_path / "lock", "x").acquire()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            FileLock(tmp_path / "lock", "x").acquire().release()
            break
        except StoreInUse:
            assert time.monotonic() < deadline
            time.sleep(0.05)
