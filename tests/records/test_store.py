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
    with pytest.raises(RecordError, match=r"status\.json: record version 1 is not supported .*version 3"):
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


def _checkpoint(folder):
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "latest.json").write_text('{"step": 4, "world_size": 1}')


def test_a_run_resumes_in_its_folder_without_what_the_interrupted_attempt_left(tmp_path):
    store = Store(tmp_path)
    folder = store.begin("abc", "x", {"a": 1})
    (folder / "metrics.jsonl").write_text('{"step": 5}\n')
    _checkpoint(folder)
    (folder / "errors").mkdir()
    (folder / "errors" / "rank1.json").write_text("{}")
    write_json_atomic(folder / "status.json", to_json(Status(RECORD_VERSION, "failed")))
    again = store.begin("abc", "x", {"a": 1}, resume=True)
    assert again == folder and (folder / "checkpoints" / "latest.json").exists()
    assert (folder / "metrics.jsonl").exists()  # the trainer cuts it back to the checkpoint
    assert not (folder / "errors").exists() and not (folder / "status.json").exists()
    # Without a checkpoint (or without resume) the run starts from a clean folder.
    assert not (store.begin("abc", "x", {"a": 1}) / "checkpoints").exists()
    assert list(folder.iterdir()) == [folder / "config.json"]


def test_a_failed_run_with_a_checkpoint_can_resume_and_a_finished_one_drops_its_checkpoints(tmp_path):
    store = Store(tmp_path)
    folder = store.begin("bad", "x", {})
    _checkpoint(folder)
    store.finish("bad", error=ErrorInfo("E", "m"))
    assert store.resumable("bad") == store.run_dir("bad")
    assert store.begin("bad", "x", {}, resume=True) == store.partial_dir("bad")
    assert not store.run_dir("bad").exists() and store.status("bad") == "running"

    good = store.begin("good", "x", {})
    _checkpoint(good)
    write_json_atomic(good / "status.json", to_json(Status(RECORD_VERSION, "completed")))
    assert store.finish("good") == "completed"
    assert not (store.run_dir("good") / "checkpoints").exists()
    assert store.resumable("good") is None


def test_a_reader_opens_the_store_without_writing_it(tmp_path):
    store = Store(tmp_path)
    folder = store.begin("abc", "x", {})
    write_json_atomic(folder / "status.json", to_json(Status(RECORD_VERSION, "completed")))
    folder.rename(store.run_dir("abc"))  # renamed, not yet indexed
    before = (tmp_path / "index.sqlite").read_bytes()
    reader = Store(tmp_path, create=False)
    assert reader.status("abc") == "completed"
    assert [r.status for r in reader.records()] == ["completed"]
    assert (tmp_path / "index.sqlite").read_bytes() == before
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(ValueError, match="is a file; give a folder"):
        Store(tmp_path / "index.sqlite")
