"""Reports on a results store: tables (mean ± std over seeds, speedup against one worker),
plots, ``report.md``, a self-contained ``report.html`` and ``results.xlsx``.

>>> from localsgd.report import make_report
>>> paths = make_report("runs/my_study")  # doctest: +SKIP

pandas and matplotlib load only when ``make_report`` is called.
"""

from __future__ import annotations

from pathlib import Path

from localsgd.report.labels import variant_label

__all__ = ["make_report", "variant_label"]


def make_report(store_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the report of the store at ``store_dir`` into ``out_dir`` (default
    ``STORE/report``): PNG plots, ``results.xlsx``, ``report.md``, ``report.html``.

    Returns the paths written, by kind (``markdown``, ``html``, ``xlsx`` and one key per
    plot). Reads only the store. ``ValueError`` if ``store_dir`` is not a store or holds no
    finished run.
    """
    from localsgd.report.build import make_report as _make_report

    return _make_report(store_dir, out_dir)
