"""Fixtures every test folder may use: the tiny text fixtures, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def text_fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``localsgd fixtures``' files (a tokenizer, a tiny BERT config and checkpoint, MNLI,
    SQuAD, text, single-text classification) and a private tokenisation cache (``cache``)."""
    pytest.importorskip("transformers")
    from localsgd.workloads.text.fixtures import write_fixtures

    root = tmp_path_factory.mktemp("text_fixtures")
    paths = write_fixtures(root)
    return {**paths, "cache": root / "cache"}
