"""Per workload *and training subset*: the primary metric against speedup, one panel each
(the fine-tuning studies' four plots: MNLI and SQuAD, on a small and a large subset), and
the same numbers as a workbook sheet.

A run's subset is its ``workload.data.train_subset`` (the first N training examples after
a seeded shuffle; "all" when unset). The speedup is the summary's: against the single
worker of the same workload and subset (the subset is part of the study's ``setting``).
"""

from __future__ import annotations

import math

import pandas as pd

from localsgd.records import Metric
from localsgd.report import graphics, plots
from localsgd.report.tables import Study, natural_key

SUBSET_KEY = "config.workload.data.train_subset"


def has_subsets(study: Study) -> bool:
    """Whether any run trained on a subset."""
    return SUBSET_KEY in study.runs.columns and study.runs[SUBSET_KEY].notna().any()


def _label(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "all"
    return str(int(value))  # type: ignore[call-overload]  # digits alone: panels sort 512 before 2048


def by_subset(study: Study, summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with ``subset`` (examples trained on) and ``panel`` ("mnli, subset 4000")
    columns, sorted by workload, subset and K."""
    runs = study.runs
    subset_of = {
        (w, g): _label(s)
        for w, g, s in zip(runs["workload"], runs["group"], runs.get(SUBSET_KEY, [None] * len(runs)))
    }
    out = summary.copy()
    out["subset"] = [subset_of.get((w, g), "all") for w, g in zip(out["workload"], out["group"])]
    out["panel"] = [f"{w}, subset {s}" for w, s in zip(out["workload"], out["subset"])]

    def key(row: pd.Series) -> tuple[object, ...]:
        number = row["subset"].replace(" ", "")
        return (
            natural_key(str(row["workload"])),
            int(number) if number.isdigit() else math.inf,
            row["workers"],
        )

    order = sorted(range(len(out)), key=lambda i: key(out.iloc[i]))
    return out.iloc[order].reset_index(drop=True)


def metric_vs_speedup_by_subset(
    table: pd.DataFrame, look: dict[str, graphics.Style], metrics: dict[str, Metric]
) -> graphics.Plot:
    """One panel per workload and subset (``table`` from :func:`by_subset`)."""
    # The panel names the subset: the legend need not repeat it (one look per label).
    groups = [_without_subset(str(g)) for g in table["group"]]
    panel_look: dict[str, graphics.Style] = {}
    for old in look:  # the report's order of the groups, which the legends follow
        panel_look.setdefault(_without_subset(old), look[old])
    panels = table.assign(workload=table["panel"], group=groups)
    per_panel = {p: metrics[w] for p, w in zip(table["panel"], table["workload"]) if w in metrics}
    return plots.metric_vs_speedup(panels, panel_look, per_panel)


def _without_subset(label: str) -> str:
    """``"local_sgd H=4, K=2 [data.train_subset=512, x=1]"`` -> ``"local_sgd H=4, K=2 [x=1]"``."""
    head, bracket, rest = label.partition(" [")
    if not bracket:
        return label
    kept = [part for part in rest.removesuffix("]").split(", ") if not part.startswith("data.train_subset=")]
    return f"{head} [{', '.join(kept)}]" if kept else head


def sheet(table: pd.DataFrame, metrics: dict[str, Metric]) -> pd.DataFrame:
    """Workload, subset, configuration, the primary metric (mean, std) and the speedup."""
    rows = []
    for row in table.to_dict("records"):
        metric = metrics.get(row["workload"])
        if metric is None:
            continue
        rows.append(
            {
                "workload": row["workload"],
                "subset": row["subset"],
                "group": row["group"],
                "workers": row["workers"],
                "n_seeds": row["n_seeds"],
                "metric": metric.name,
                "final_mean": row.get(f"final_{metric.name}_mean"),
                "final_std": row.get(f"final_{metric.name}_std"),
                "wall_seconds_mean": row.get("wall_seconds_mean"),
                "speedup": row.get("speedup"),
            }
        )
    return pd.DataFrame(rows)
