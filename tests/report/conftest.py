"""The report of the synthetic store (stores.py), written once for every test that reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from localsgd.report import make_report
from report.stores import build_store


@pytest.fixture(scope="session")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """(store root, paths written): every figure in every format, the default."""
    root = tmp_path_factory.mktemp("study")
    build_store(root)
    return root, make_report(root)
