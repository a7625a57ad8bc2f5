"""Group commits of record files, the store's runs begun and finished together, and the
record's JSON form."""

from __future__ import annotations

import dataclasses
import errno
import json
import math

import pytest

from localsgd.records import RECORD_VERSION, ErrorInfo, MetricsRow, Status, Store
from localsgd.records import group as group_module
from localsgd.records.group import GroupWrite
from localsgd.records.record import Counters, Metric, RunWriter, read_json, to_json
from localsgd.util.files import DiskFull, write_json_atomic


def test_a_group_commit_writes_every_file_whole_with_one_flush(tmp_path, monkeypatch):
    flushed: list[list[str]] = []
    flush = group_module._flush
    monkeypatch.setattr(
        group_module, "_flush", lambda paths: flushed.append([p.name for p in paths]) or flush(paths)
    )
    folders = [tmp_path / f"run{i}" for i in range(3)]
    for folder in folders:
        folder.mkdir()
    (folders[0] / "status.json").write_text("old")
    group = GroupWrite()
    for i, folder in enumerate(folders):
        group.add_json(folder / "status.json", {"run": i, "loss": 0.5})
        group.add(folder / "checkpoint.pt", bytes([i]) * 10)
    group.add_json(folders[2] / "status.json", {"run": 2, "loss": 0.25})  # the last version wins
    assert len(group) == 6
    group.commit()
    assert len(group) == 0
    for i, folder in enumerate(folders):
        assert read_json(folder / "status.json") == {"run": i, "loss": 0.25 if i == 2 else 0.5}
        assert (folder / "checkpoint.pt").read_bytes() == bytes([i]) * 10
        assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "status.json"]  # no temporaries
    # The same text write_json_atomic writes; the data flushed once before the renames,
    # the folders once after (not once per file).
    write_json_atomic(tmp_path / "alone.json", {"run": 0, "loss": 0.5})
    assert (folders[0] / "status.json").read_text() == (tmp_path / "alone.json").read_text()
    assert len(flushed) == 2 and len(flushed[0]) == 6 and sorted(flushed[1]) == ["run0", "run1", "run2"]
    GroupWrite().commit()  # nothing to write: no flush
    assert len(flushed) == 2


def test_a_group_commit_that_fails_leaves_every_file_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text("old a")
    group = GroupWrite()
    group.add(tmp_path / "a.json", "new a")
    group.add(tmp_path / "missing" / "b.json", "new b")  # a folder that is not there
    with pytest.raises(FileNotFoundError):
        group.commit()
    assert (tmp_path / "a.json").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]

    def full(paths: list) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(group_module, "_flush", full)
    group.add(tmp_path / "a.json", "new a")
    group.add(tmp_path / "c.json", "new c")
    with pytest.raises(DiskFull, match=r"a\.json"):
        group.commit()
    assert (tmp_path / "a.json").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_run_writers_add_their_files_to_a_group(tmp_path):
    writers = [RunWriter(tmp_path / f"r{i}") for i in range(2) if (tmp_path / f"r{i}").mkdir() is None]
    group = GroupWrite()
    for writer in writers:
        writer.status(Status(RECORD_VERSION, "completed", steps=3), group)
    assert not any((w.run_dir / "status.json").exists() for w in writers if w.run_dir)
    group.commit()
    assert [read_json(w.run_dir / "status.json")["steps"] for w in writers if w.run_dir] == [3, 3]
    RunWriter(None).status(Status(RECORD_VERSION, "completed"), group)  # another rank's: nothing
    assert len(group) == 0
    for writer in writers:
        writer.close()


def test_runs_begun_and_finished_together_are_recorded_as_one_by_one(tmp_path):
    together, alone = Store(tmp_path / "together"), Store(tmp_path / "alone")
    runs = [(f"id{i}", f"trial-{i}", {"optimizer": {"lr": 0.1 * i}}) for i in range(3)]
    folders = together.begin_many(runs)
    for (run_id, name, config), folder in zip(runs, folders):
        other = alone.begin(run_id, name, config)
        assert folder == together.partial_dir(run_id)
        assert (folder / "config.json").read_text() == (other / "config.json").read_text()
    assert [together.status(r[0]) for r in runs] == ["running"] * 3
    diverged = Status(RECORD_VERSION, "diverged", error=ErrorInfo("Diverged", "train loss is nan at step 4"))
    for store in (together, alone):
        write_json_atomic(store.partial_dir("id1") / "status.json", to_json(diverged))
        write_json_atomic(
            store.partial_dir("id2") / "status.json", to_json(Status(RECORD_VERSION, "completed"))
        )
    assert together.finish_many(["id1", "id2"]) == ["diverged", "completed"]
    assert [alone.finish("id1"), alone.finish("id2")] == ["diverged", "completed"]
    # The last has no status (its batch failed): failed with the root error, as finish does.
    root = ErrorInfo("RuntimeError", "boom")
    assert together.finish_many(["id0"], error=root) == ["failed"]
    assert alone.finish("id0", error=root) == "failed"
    for store in (together, alone):
        records = {r.run_id: r for r in store.records()}
        assert {k: r.status for k, r in records.items()} == {
            "id0": "failed",
            "id1": "diverged",
            "id2": "completed",
        }
        assert records["id0"].error is not None and records["id0"].error.message == "boom"
        assert not list(store.root.joinpath("runs").glob("*.partial"))
    with Store(tmp_path / "together")._db() as db:
        rows = dict(db.execute("SELECT run_id, error FROM runs").fetchall())
    assert rows == {"id0": "RuntimeError: boom", "id1": "Diverged: train loss is nan at step 4", "id2": None}
    # Begun again on purpose: a fresh folder, the attempt counted.
    (folder,) = together.begin_many([runs[2]])
    assert not together.run_dir("id2").exists() and sorted(p.name for p in folder.iterdir()) == [
        "config.json"
    ]
    with together._db() as db:
        assert db.execute("SELECT attempts, status FROM runs WHERE run_id = 'id2'").fetchone() == (
            2,
            "running",
        )


def _asdict_json(record: object) -> object:
    """The record's JSON form as dataclasses.asdict gives it."""

    def plain(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(record))  # type: ignore[call-overload]


def test_to_json_is_the_dataclass_as_json():
    row = MetricsRow(
        step=4,
        epoch=0.5,
        samples=64,
        wall_seconds=1.5,
        lr=math.inf,
        train_loss=math.nan,
        metrics={"accuracy": 0.5, "eval_loss": None},
        by_scope={"world": {"bytes": 4.0, "seconds": -math.inf}},
    )
    status = Status(
        RECORD_VERSION,
        "diverged",
        error=ErrorInfo("Diverged", "nan", rank=0),
        metrics=(Metric("accuracy", unit="%", scale=100.0),),
        final=row,
        counters=Counters(steps=4, by_scope={"world": {"bytes": 1.0}}),
        details={"nested": [{"a": (1, 2.5, math.nan)}], 3: "int key"},
        resumed=(2, 3),
    )
    for record in (row, status):
        assert to_json(record) == _asdict_json(record)
        json.dumps(to_json(record), allow_nan=False)  # strict JSON
    with pytest.raises(TypeError, match="record dataclass"):
        to_json({"not": "a record"})
