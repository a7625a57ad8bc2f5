"""Reports on a results store: tables (mean ± std over seeds, speedup against one worker),
figures (PNG, PDF, SVG), ``report.md``, a self-contained ``report.html`` and
``results.xlsx``, all from the metrics each workload declared.

>>> from localsgd.report import make_report
>>> paths = make_report("runs/my_study")  # doctest: +SKIP

pandas and matplotlib load only when ``make_report`` is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from localsgd.report.labels import variant_label

if TYPE_CHECKING:
    from localsgd.costmodel import Cluster
    from localsgd.report.build import Written

__all__ = ["make_report", "variant_label"]


def make_report(
    store_dir: str | Path,
    out_dir: str | Path | None = None,
    cluster: Cluster | str | Path | None = None,
    target: str | None = None,
    formats: str | Sequence[str] = ("png", "pdf", "svg"),
    dpi: int = 200,
    select_on: str = "validation",
) -> Written:
    """See :func:`localsgd.report.build.make_report` (imported on first call): the paths
    written, by kind, and ``.problems``, what of the store could not be read."""
    from localsgd.report.build import make_report as _make_report

    return _make_report(store_dir, out_dir, cluster, target, formats, dpi, select_on)
