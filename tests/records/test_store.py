"""The store: runs that died, runs renamed but not indexed, unreadable and foreign records."""

from __future__ import annotations

import json

import pytest

from localsgd.records import RECORD_VERSION, ErrorInfo, RecordError, Status, Store
from localsgd.records.record import to_json
from localsgd.util.files import write_json_atomic


def test_store_records_a_run_that_died_without_a_status(tmp_path):
    store = Store(tmp_path)
    store.begin("abc", "x", {"workers": 2})
    root = ErrorInfo("ZeroDivisionError", "division by zero", "Traceback ...", rank=1)
    assert store.finish("abc", error=root) == "failed"
    (record,) = store.records()
    assert record.status == "failed" and record.error == root
    assert store.error("abc") == root
    assert record.error.line() == "ZeroDivisionError: division by zero (rank 1)"
    with pytest.raises(ValueError, match="is not a localsgd store"):
        Store(tmp_path / "elsewhere", create=False)


def test_the_root_error_replaces_a_rank_0_error_that_a_peer_caused(tmp_path):
    store = Store(tmp_path)
    folder = store.begin("abc", "x", {})
    secondary = ErrorInfo("RuntimeError", "Connection closed by peer", rank=0)
    write_json_atomic(folder / "status.json", to_json(Status(RECORD_VERSION, "failed", error=secondary)))
    root = ErrorInfo("KeyError", "'x'", rank=1)
    store.finish("abc", error=root)
    assert store.error("abc") == root


def test_a_run_renamed_but_not_indexed_is_reconciled(tmp_path):
    store = Store(tmp_path)
    folder = store.begin("abc", "x", {})
    status = Status(RECORD_VERSION, "diverged", error=ErrorInfo("Diverged", "loss nan"))
    write_json_atomic(folder / "status.json", to_json(status))
    folder.rename(store.run_dir("abc"))  # killed between the rename and the index update
    assert store.status("abc") == "diverged"
    assert [r.status for r in store.records()] == ["diverged"]


def test_config_snapshot_is_versioned(tmp_path):
    store = Store(tmp_path)
    folder = store.begin("abc", "x", {"workers": 2})
    snapshot = json.loads((folder / "config.json").read_text())
    assert snapshot == {"version": RECORD_VERSION, "run_id": "abc", "config": {"workers": 2}}


def test_records_of_another_version_are_refused_naming_the_file(tmp_path):
    store = Store(tmp_path)
    folder = store.begin("abc", "x", {})
    write_json_atomic(folder / "status.json", {"version": 1, "status": "completed"})
    folder.rename(store.run_dir("abc"))
    with pytest.raises(RecordError, match=r"status\.json: record version 1 is not supported .*version 2"):
        store.records()


def test_missing_or_corrupt_run_folders_are_flagged_not_counted(tmp_path):
    store = Store(tmp_path)
    for run_id in ("gone", "bad"):
        store.begin(run_id, "x", {})
        store.finish(run_id, error=ErrorInfo("E", "m"))
    import shutil

    shutil.rmtree(store.run_dir("gone"))
    (store.run_dir("bad") / "status.json").write_text("{not json")
    problems = {r.run_id: r.problem for r in store.records()}
    assert "is missing" in problems["gone"]
    assert "status.json is unreadable" in problems["bad"]


def test_a_corrupt_index_is_named(tmp_path):
    (tmp_path / "index.sqlite").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ValueError, match=r"index\.sqlite is not a readable SQLite index"):
        Store(tmp_path)
