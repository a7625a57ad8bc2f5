"""Reports on a results store: tables (mean ± std over seeds, speedup against one worker),
plots, ``report.md``, a self-contained ``report.html`` and ``results.xlsx``.

>>> from localsgd.report import make_report
>>> paths = make_report("runs/my_study")  # doctest: +SKIP

pandas and matplotlib load only when ``make_report`` is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from localsgd.report.labels import variant_label

if TYPE_CHECKING:
    from localsgd.costmodel import Cluster

__all__ = ["make_report", "variant_label"]


def make_report(
    store_dir: str | Path,
    out_dir: str | Path | None = None,
    cluster: Cluster | str | Path | None = None,
    target_accuracy: float | None = None,
) -> dict[str, Path]:
    """Write the report of the store at ``store_dir`` into ``out_dir`` (default
    ``STORE/report``): PNG plots, ``results.xlsx``, ``report.md``, ``report.html``.

    With ``cluster`` (a :class:`localsgd.costmodel.Cluster`, a preset name such as
    ``"10gbe"``, or a cluster TOML path) the report adds wall-clock estimates on that
    cluster: estimated compute, communication and total seconds, estimated speedup over one
    worker, estimated time to ``target_accuracy`` (a fraction; default 0.95 × the best mean
    final accuracy of each workload), and two plots (``accuracy_vs_est_speedup``,
    ``accuracy_vs_est_time``).

    Returns the paths written, by kind (``markdown``, ``html``, ``xlsx`` and one key per
    plot). Reads only the store. ``ValueError`` if ``store_dir`` is not a store or holds no
    finished run, for an unknown cluster, or a target outside (0, 1].
    """
    from localsgd.report.build import make_report as _make_report

    return _make_report(store_dir, out_dir, cluster, target_accuracy)
