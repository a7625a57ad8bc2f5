"""MLflow: one MLflow run per localsgd run, in ``MLFLOW_TRACKING_URI`` or else a local file
store, ``<output>/trackers/mlruns``; the experiment is ``MLFLOW_EXPERIMENT_NAME`` or the
study's name, the run named by its variant and tagged with the study and the run id
(``localsgd.study``, ``localsgd.run_id``); the resolved config as params. An interrupted
run that resumes continues the MLflow run tagged with its id.

MLflow 3 keeps the file store in maintenance mode (``MLFLOW_ALLOW_FILE_STORE`` opts in;
the database stores need SQLAlchemy, which ``mlflow-skinny`` leaves out): localsgd opts in
for the default local store only, and any ``MLFLOW_TRACKING_URI``
(``sqlite:///mlflow.db``, a server) is used as given."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from localsgd.trackers import Destination
from localsgd.util.nest import flatten

FOLDER = "mlruns"
MAX_PARAMS = 100
"""Params per ``log_batch`` call, MLflow's limit."""
MAX_PARAM_CHARS = 6000
"""The longest param value MLflow stores."""


def tracking_uri(where: Destination) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (where.root / FOLDER).resolve().as_uri()


def client(uri: str) -> MlflowClient:
    """A client of ``uri``; a local file store allowed for this client alone when the
    user has not decided it themselves."""
    if not uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        return MlflowClient(tracking_uri=uri)
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        return MlflowClient(tracking_uri=uri)
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]


class MlflowRun:
    def __init__(self, where: Destination, config: Mapping[str, Any], resumed_at: int | None) -> None:
        self.client = client(tracking_uri(where))
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or where.group
        tags = {"localsgd.study": where.study} if where.study else {}
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(name, tags=tags)
        )
        run_tags = {**tags, "localsgd.run_id": where.run_id}
        found = (
            self.client.search_runs(
                [experiment_id], f"tags.`localsgd.run_id` = '{where.run_id}'", max_results=1
            )
            if resumed_at is not None
            else []
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(
            experiment_id, run_name=where.run_name, tags=run_tags
        ).info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(config).items()]
        for start in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[start : start + MAX_PARAMS], tags=[])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "completed" else "FAILED")


def open_run(where: Destination, config: Mapping[str, Any], resumed_at: int | None) -> MlflowRun:
    return MlflowRun(where, config, resumed_at)
