"""Display columns shared by the report's tables (summary, cluster estimates, status): a
configuration's identity, its metrics, speedup and communication cells."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from localsgd.records import Metric
from localsgd.report.rounding import fmt, fmt_pm
from localsgd.report.tables import Study

NOT_APPLICABLE = "—"

Column = tuple[str, Callable[[Any], str]]
"""(header, row -> cell text)."""


def key_columns(study: Study) -> list[Column]:
    """What tells a configuration apart: workload (when several), variant, K, B, lr, and
    the engine and setting when they vary."""
    runs = study.runs
    columns: list[Column] = []
    if runs["workload"].nunique() > 1:
        columns.append(("workload", lambda r: str(r.workload)))
    columns += [
        ("variant", lambda r: str(r.variant)),
        ("K", lambda r: str(r.workers)),
        ("B", lambda r: str(r.batch_size)),
        ("lr", lambda r: fmt(r.lr)),
    ]
    if "engine" in study.group_keys:
        columns.append(("engine", lambda r: str(r.engine)))
    if "setting" in study.group_keys:
        columns.append(("setting", lambda r: str(r.setting)))
    return columns


def metric_columns(study: Study, *, best: bool, every: bool) -> list[Column]:
    """Display columns of the declared metrics: the final value of every metric (or of the
    primary ones only), and the best value of the primary ones."""
    primaries = {study.primaries[w] for w in study.primaries}
    columns: list[Column] = []
    for m in study.metric_list():
        if not every and m.name not in primaries:
            continue

        def final(r: Any, m: Metric = m) -> str:
            return fmt_pm(getattr(r, f"final_{m.name}_mean"), getattr(r, f"final_{m.name}_std"), m.scale)

        columns.append((f"final {m.heading}", final))
        if best and m.name in primaries:

            def best_cell(r: Any, m: Metric = m) -> str:
                return fmt_pm(getattr(r, f"best_{m.name}_mean"), getattr(r, f"best_{m.name}_std"), m.scale)

            columns.append((f"best {m.heading}", best_cell))
    return columns


def speedup(mean: Any, std: Any) -> str:
    """Speedup ± its propagated std; the baseline itself is 1 by definition."""
    if mean == 1.0 and std == 0.0:
        return "1 (baseline)"
    return fmt_pm(mean, std)


def comm(row: Any, mean: Any, std: Any) -> str:
    """A communication figure, or — for one worker, which communicates nothing."""
    return NOT_APPLICABLE if int(row.workers) == 1 else fmt_pm(mean, std)
