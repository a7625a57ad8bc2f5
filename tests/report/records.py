"""Writing synthetic run records into a store, as the trainer would."""

from __future__ import annotations

from typing import Any

from localsgd.records import (
    RECORD_VERSION,
    Counters,
    EngineInfo,
    ErrorInfo,
    MetricsRow,
    RunWriter,
    Status,
    Store,
)
from localsgd.workloads import ACCURACY, EVAL_LOSS

PROCESSES = EngineInfo("processes", real_wall_time=True)


def metrics_row(row: dict[str, Any]) -> MetricsRow:
    """A test's plain row (``test_accuracy``, ``test_loss``, optionally
    ``validation_accuracy`` and ``validation_loss``, and counters) as a record row."""
    return MetricsRow(
        step=row["step"],
        epoch=row["epoch"],
        samples=row["samples"],
        wall_seconds=row["wall_seconds"],
        lr=row.get("lr", 0.1),
        train_loss=row.get("train_loss"),
        metrics={"accuracy": row["test_accuracy"], "eval_loss": row["test_loss"]},
        validation=(
            {"accuracy": row["validation_accuracy"], "eval_loss": row.get("validation_loss", 0.0)}
            if "validation_accuracy" in row
            else {}
        ),
        bytes=row.get("bytes", 0),
        syncs=row.get("syncs", 0),
        collectives=row.get("collectives", 0),
        comm_seconds=row.get("comm_seconds", 0.0),
        by_scope=row.get("by_scope", {}),
    )


def write_run(
    store: Store,
    run_id: str,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    status: str,
    error: str | None = None,
    counters: dict[str, Any] | None = None,
    engine: EngineInfo = PROCESSES,
) -> str:
    """Begin, write and finish one run; a failed run gets ``error`` as its root cause."""
    folder = store.begin(run_id, config["name"], config)
    writer = RunWriter(folder)
    for row in rows:
        writer.row(metrics_row(row))
    writer.close()
    if status == "failed":
        kind, _, message = (error or "RuntimeError: failed").strip().splitlines()[-1].partition(": ")
        return store.finish(run_id, error=ErrorInfo(kind, message, error or ""))
    last = writer.rows[-1]
    writer.status(
        Status(
            RECORD_VERSION,
            status,
            error=ErrorInfo("Diverged", error or "") if status == "diverged" else None,
            steps=last.step,
            epochs=last.epoch,
            samples=last.samples,
            wall_seconds=last.wall_seconds,
            metrics=(ACCURACY, EVAL_LOSS),
            primary="accuracy",
            best={"accuracy": max(r.metrics["accuracy"] for r in writer.rows)},
            final=last,
            counters=Counters(**counters) if counters else None,
            engine=engine,
        )
    )
    return store.finish(run_id)
