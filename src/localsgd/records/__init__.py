"""Run records and the results store: the typed, versioned files a run leaves behind, and
the directory of runs with its SQLite index that a study writes and a report reads.

This layer sits below both the studies that write records and the report that reads them;
it imports neither torch nor anything of the layers above.
"""

from localsgd.records.record import (
    RECORD_VERSION,
    ConfigSnapshot,
    Counters,
    EngineInfo,
    Environment,
    ErrorInfo,
    Metric,
    MetricsRow,
    RecordError,
    RecordVersionError,
    RunWriter,
    Status,
)
from localsgd.records.store import FINISHED, RunRecord, Store

__all__ = [
    "FINISHED",
    "RECORD_VERSION",
    "ConfigSnapshot",
    "Counters",
    "EngineInfo",
    "Environment",
    "ErrorInfo",
    "Metric",
    "MetricsRow",
    "RecordError",
    "RecordVersionError",
    "RunRecord",
    "RunWriter",
    "Status",
    "Store",
]
