"""``[train] log_to``: what TensorBoard, MLflow and W&B hold after a study, read back with
each library's own reader and compared with the runs' own metrics rows."""

from __future__ import annotations

import json
import logging
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localsgd.records import MetricsRow, Store
from localsgd.run.config import RunConfig, run_config
from localsgd.run.execute import execute_run, preflight
from localsgd.studies.loading import load_study
from localsgd.studies.runner import run_study
from localsgd.trackers import row_values
from localsgd.util.checks import ConfigError

STUDY = """
[study]
name = "trk-test"

[base]
workload = {name = "mnist1d_mlp", num_samples = 1000}
workers = 2
engine = "simulated"
device = "cpu"
[base.data]
batch_size = 16
[base.train]
epochs = 1
max_steps = 8
eval_every = 4
log_to = ["tensorboard", "wandb", "mlflow"]

[[grid]]
algorithm = [{name = "minibatch_sgd"}, {name = "local_sgd", period = 2}]
"""

NAMES = {"minibatch_sgd": "minibatch_sgd K=2 lr=0.1 seed=0", "local_sgd": "local_sgd H=2 K=2 lr=0.1 seed=0"}
"""Each variant's run name: its label, as the report names it, and what sets it apart."""

TRACKER_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_SILENT", "MLFLOW_TRACKING_URI")
TRACKER_ENV += ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE")


def runs_by_algorithm(out: Path) -> dict[str, tuple[str, list[MetricsRow]]]:
    """Each run's id and metrics rows, by its algorithm's name."""
    return {r.config["algorithm"]["name"]: (r.run_id, r.metrics()) for r in Store(out).records()}


def expected(rows: list[MetricsRow]) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) series each tracker key should hold."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row_values(row).items():
            series.setdefault(key, []).append((row.step, value))
    return series


def assert_float32_series(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """The same steps, and values equal as event files store them (float32)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_a_study_logs_its_rows_and_configs_to_tensorboard_mlflow_and_wandb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_cache: str
) -> None:
    """One test for the three trackers: pytest-xdist would otherwise train the study (and
    start W&B's service) once per worker that reads it."""
    for library in ("tensorboard", "wandb", "mlflow"):
        pytest.importorskip(library)
    (tmp_path / "s.toml").write_text(STUDY)
    with monkeypatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", data_cache)
        for name in TRACKER_ENV:
            mp.delenv(name, raising=False)  # each library's defaults: offline, local
        mp.setenv("WANDB_PROJECT", "trk-project")  # but the project, the usual way
        counts = run_study(load_study(tmp_path / "s.toml"), tmp_path / "out", progress=False)
    assert counts == {"completed": 2}
    check_rows(tmp_path / "out")
    check_tensorboard(tmp_path / "out")
    check_mlflow(tmp_path / "out", monkeypatch)
    check_wandb(tmp_path / "out")


def check_rows(out: Path) -> None:
    """Every row carries the metrics per split, the learning rate and the counters."""
    for _, rows in runs_by_algorithm(out).values():
        assert [r.step for r in rows] == [4, 8]
        keys = set(expected(rows))
        assert {
            "test/accuracy",
            "validation/accuracy",
            "train/loss",
            "lr",
            "comm/bytes",
            "comm/syncs",
        } <= keys
        assert rows[-1].bytes > 0 and rows[-1].syncs > 0


def check_tensorboard(out: Path) -> None:
    """One folder per run under the study's, holding the rows and the config."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    board = out / "trackers" / "tensorboard"
    runs = runs_by_algorithm(out)
    assert sorted(p.name for p in board.iterdir()) == sorted(
        f"{NAMES[a].replace(' ', '_')}-{run_id}" for a, (run_id, _) in runs.items()
    )
    for algorithm, (run_id, rows) in runs.items():
        folder = board / f"{NAMES[algorithm].replace(' ', '_')}-{run_id}"
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
        events = EventAccumulator(str(folder))
        events.Reload()
        for key, series in expected(rows).items():
            assert_float32_series([(e.step, e.value) for e in events.Scalars(key)], series)
        content = events.PluginTagToContent("hparams")
        # No experiment summary: the dashboard builds it from all the runs' sessions.
        assert set(content) == {"_hparams_/session_start_info"}
        data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        params = data.session_start_info.hparams
        assert params["algorithm.name"].string_value == algorithm
        assert params["optimizer.lr"].number_value == 0.1
        assert params["run_id"].string_value == run_id
        assert json.loads(params["train.log_to"].string_value) == ["tensorboard", "wandb", "mlflow"]


def mlflow_client(out: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store, opted into
    return MlflowClient(tracking_uri=(out / "trackers" / "mlruns").as_uri())


def check_mlflow(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The study's experiment, runs named by variant with the rows and the params."""
    client = mlflow_client(out, monkeypatch)
    experiment = client.get_experiment_by_name("trk-test")
    assert experiment.tags["localsgd.study"] == "trk-test"
    found = {r.data.tags["localsgd.run_id"]: r for r in client.search_runs([experiment.experiment_id])}
    runs = runs_by_algorithm(out)
    assert sorted(found) == sorted(run_id for run_id, _ in runs.values())
    for algorithm, (run_id, rows) in runs.items():
        run = found[run_id]
        assert run.info.run_name == NAMES[algorithm]
        assert run.info.status == "FINISHED"
        assert run.data.tags["localsgd.study"] == "trk-test"
        assert run.data.params["algorithm.name"] == algorithm
        assert run.data.params["optimizer.lr"] == "0.1"
        assert run.data.params["workers"] == "2"
        assert run.data.params["run_id"] == run_id
        for key, series in expected(rows).items():
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted((m.step, m.value) for m in history) == series


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B transaction log (``run-<id>.wandb``), decoded with wandb's own
    protocol buffers. wandb 0.31 reads these files in its Go core only, so the framing is
    read here: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks,
    each a CRC, a little-endian length and a type (full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def check_wandb(out: Path) -> None:
    """An offline folder per run, grouped and tagged by the study, with rows and config."""
    folders = sorted((out / "trackers" / "wandb").glob("offline-run-*"))
    runs = runs_by_algorithm(out)
    assert len(folders) == len(runs)
    seen = set()
    for folder in folders:
        (log,) = folder.glob("run-*.wandb")
        records = list(wandb_records(log))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        algorithm = config["algorithm"]["name"]
        run_id, rows = runs[algorithm]
        seen.add(algorithm)
        assert run.display_name == NAMES[algorithm]
        assert (run.run_group, list(run.tags), run.project) == ("trk-test", ["trk-test"], "trk-project")
        assert run.run_id == f"trk-test-{run_id}"
        assert config["optimizer"]["lr"] == 0.1 and config["run_id"] == run_id
        series: dict[str, list[tuple[int, float]]] = {}
        for record in records:
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
                }
                for key, value in items.items():
                    if not key.startswith("_"):
                        series.setdefault(key, []).append((record.history.step.num, value))
        assert series == expected(rows)
        (end,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
        assert end.exit_code == 0
    assert seen == set(runs)


RUN: dict[str, Any] = {
    "workload": {"name": "mnist1d_mlp", "num_samples": 1000},
    "workers": 2,
    "engine": "simulated",
    "device": "cpu",
    "algorithm": {"name": "local_sgd", "period": 2},
    "data": {"batch_size": 16},
    "train": {"epochs": 1, "max_steps": 8, "eval_every": 4},
}


def with_trackers(*names: str, **changes: Any) -> RunConfig:
    return run_config({**RUN, **changes, "train": {**RUN["train"], "log_to": list(names)}})


def test_log_to_leaves_the_run_id_alone() -> None:
    plain = run_config(RUN)
    assert with_trackers("tensorboard", "wandb", "mlflow").run_id() == plain.run_id()
    assert with_trackers("mlflow").train.log_to == ("mlflow",)


@pytest.mark.parametrize(
    ("log_to", "message"),
    [
        (
            ["neptune"],
            r"^train\.log_to must list trackers among \['tensorboard', 'wandb', 'mlflow'\], got 'neptune'$",
        ),
        (["wandb", "wandb"], r"^train\.log_to names a tracker twice: \['wandb', 'wandb'\]$"),
        ("wandb", r"^train\.log_to must be a list"),
    ],
)
def test_log_to_errors_name_the_key_and_what_is_allowed(log_to: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_config({**RUN, "train": {**RUN["train"], "log_to": log_to}})


def test_a_missing_tracker_library_is_refused_before_the_data_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(
        ConfigError,
        match=r"^train\.log_to = \['wandb'\]: wandb needs the wandb package; pip install 'localsgd\[trackers\]'$",
    ):
        preflight([with_trackers("wandb")])


def tensorboard_series(folder: Path, key: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(key)]


def test_a_failing_tracker_is_dropped_and_the_run_keeps_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, data_cache: str
) -> None:
    pytest.importorskip("tensorboard")
    from localsgd.trackers.tensorboard import TensorBoardRun

    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)

    def broken(self: Any, step: int, values: Any) -> None:
        if step > 4:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardRun, "log", broken)
    store = Store(tmp_path / "store")
    config = with_trackers("tensorboard")
    with caplog.at_level(logging.WARNING, logger="localsgd.trackers.writer"):
        assert execute_run(config, store) == "completed"
    assert [r.step for r in store.records()[0].metrics()] == [4, 8]
    assert f"tracker tensorboard: stopped logging run {config.run_id()}: OSError" in caplog.text


@pytest.fixture
def local_trackers(monkeypatch: pytest.MonkeyPatch, data_cache: str) -> None:
    """TensorBoard and MLflow at their defaults (local files), the session's data cache."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("XDG_CACHE_HOME", data_cache)
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)


def test_batched_trials_each_log_their_own_run_into_the_users_mlflow_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_trackers: None
) -> None:
    from mlflow.tracking import MlflowClient

    from localsgd.run.trials import execute_trials

    elsewhere = (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)  # the user's own store, as given
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = Store(tmp_path / "store")
    store.set_owner("trials")
    configs = [with_trackers("tensorboard", "mlflow", optimizer={"lr": lr}) for lr in (0.05, 0.1)]
    assert execute_trials(configs, store) == ["completed", "completed"]
    assert not (tmp_path / "store" / "trackers" / "mlruns").exists()
    client = MlflowClient(tracking_uri=elsewhere)
    experiment = client.get_experiment_by_name("trials")
    found = {r.data.tags["localsgd.run_id"]: r for r in client.search_runs([experiment.experiment_id])}
    for config, lr in zip(configs, (0.05, 0.1)):
        rows = Store(tmp_path / "store").records()
        (record,) = [r for r in rows if r.run_id == config.run_id()]
        series = expected(record.metrics())
        assert series["lr"][0] == (4, lr)
        name = f"local_sgd H=2 K=2 lr={lr:g} seed=0"
        folder = (
            tmp_path / "store" / "trackers" / "tensorboard" / f"{name.replace(' ', '_')}-{config.run_id()}"
        )
        assert_float32_series(tensorboard_series(folder, "test/accuracy"), series["test/accuracy"])
        run = found[config.run_id()]
        assert run.info.run_name == name
        history = client.get_metric_history(run.info.run_id, "test/accuracy")
        assert sorted((m.step, m.value) for m in history) == series["test/accuracy"]


def test_a_processes_run_logs_once_from_rank_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_trackers: None
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = Store(tmp_path / "store")
    config = with_trackers("tensorboard", "mlflow", engine="processes")
    assert execute_run(config, store) == "completed"
    rows = store.records()[0].metrics()
    (folder,) = (tmp_path / "store" / "trackers" / "tensorboard").iterdir()
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # one writer: rank 0
    assert tensorboard_series(folder, "comm/bytes") == [(r.step, float(r.bytes)) for r in rows]
    client = mlflow_client(tmp_path / "store", monkeypatch)
    experiment = client.get_experiment_by_name(config.name)
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "comm/syncs")
    assert sorted((m.step, m.value) for m in history) == [(r.step, float(r.syncs)) for r in rows]


def row(step: int, accuracy: float) -> MetricsRow:
    """A metrics row at ``step`` with the test accuracy ``accuracy``."""
    return MetricsRow(
        step,
        step / 10,
        32 * step,
        0.1 * step,
        0.1,
        1.0,
        {"accuracy": accuracy},
        bytes=8 * step,
        syncs=step,
    )


def test_a_resumed_run_continues_its_trackers_from_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_trackers: None
) -> None:
    from localsgd.records import RECORD_VERSION, Status
    from localsgd.run.tracking import run_writer

    store = Store(tmp_path / "store")
    store.set_owner("resumed")
    config = with_trackers("tensorboard", "mlflow")
    folder = store.begin(config.run_id(), config.name, config.to_dict())

    first = run_writer(config, folder)
    first.row(row(4, 0.25))
    first.row(row(8, 0.5))  # after the checkpoint of step 4: trained again on resume
    first.close()  # interrupted: no status
    second = run_writer(config, folder)
    second.restore([row(4, 0.25)])
    second.row(row(8, 0.625))
    second.row(row(12, 0.75))
    second.close()
    second.status(Status(RECORD_VERSION, "completed"))

    (board,) = (tmp_path / "store" / "trackers" / "tensorboard").iterdir()
    assert tensorboard_series(board, "test/accuracy") == [(4, 0.25), (8, 0.625), (12, 0.75)]
    client = mlflow_client(tmp_path / "store", monkeypatch)
    (run,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] == 0.75
    assert {m.step for m in client.get_metric_history(run.info.run_id, "test/accuracy")} == {4, 8, 12}


@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "minibatch_sgd"},
        {"name": "local_sgd", "period": 4},
        {"name": "post_local_sgd", "period": 4, "switch_epoch": 2.5},
        {"name": "slowmo", "period": 8, "outer_momentum": 0.5},
    ],
)
def test_run_names_use_the_reports_variant_label(algorithm: dict[str, Any]) -> None:
    from localsgd.report.labels import variant_label
    from localsgd.run.tracking import variant

    config = run_config({**RUN, "algorithm": algorithm})
    assert variant(config) == variant_label(config.to_dict())


@pytest.mark.parametrize(("status", "mlflow_status"), [("diverged", "FAILED"), ("failed", "FAILED")])
def test_a_run_that_did_not_complete_ends_so_in_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_trackers: None, status: str, mlflow_status: str
) -> None:
    from localsgd.records import RECORD_VERSION, Status
    from localsgd.run.tracking import run_writer

    store = Store(tmp_path / "store")
    config = with_trackers("mlflow")
    writer = run_writer(config, store.begin(config.run_id(), config.name, config.to_dict()))
    writer.row(row(4, 0.25))
    writer.close()
    writer.status(Status(RECORD_VERSION, status))
    client = mlflow_client(tmp_path / "store", monkeypatch)
    (run,) = client.search_runs([client.get_experiment_by_name(config.name).experiment_id])
    assert run.info.status == mlflow_status
    assert run.data.metrics["test/accuracy"] == 0.25
