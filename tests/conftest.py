"""Fixtures every test folder may use: the tiny text fixtures, written once per session, and
one cache of generated data sets for the whole session."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An ``XDG_CACHE_HOME`` for the session, for the tests that do not test the cache
    itself: each MNIST-1D size is generated once (seconds of importing scipy and
    generating, in every rank of a world that misses it) instead of once per test. The
    cache's files are keyed by what they hold and written atomically, so the parallel
    workers of one session (pytest-xdist) share one folder."""
    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker has its own base folder, beside its siblings'.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / "data-cache"
    folder.mkdir(exist_ok=True)
    return str(folder)



@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory, data_cache: str) -> Path:
    """``harness.FAULT_TRAINING`` on ``FAULT_WORKLOAD``, trained in one go by its own
    launcher: the run folder every interrupted and resumed copy of it must end as, trained
    once for the fault tests of every module."""
    from harness import FAULT_TRAINING, FAULT_WORKLOAD
    from localsgd.records import Store
    from localsgd.run.config import run_config
    from localsgd.run.execute import execute_run

    store = Store(tmp_path_factory.mktemp("uninterrupted"))
    run = run_config({**FAULT_TRAINING, "workload": FAULT_WORKLOAD})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", data_cache)
        assert execute_run(run, store) == "completed"
    return store.run_dir(run.run_id())

# Tests that hold what only one test on the machine may hold at a time: the network
# namespaces, veth pairs and routes of emulated clusters, and the clean-up of stale
# emulations, which must not meet another test's half-built one. Each folder here is one
# group, which pytest-xdist runs on one worker, one test after another.
EXCLUSIVE_FOLDERS = ("emulation",)


# First among the hooks: pytest-xdist's own reads the groups (and names each grouped test
# ``NODEID@GROUP``) in this same hook, and would not see a group added after it.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        folder = item.path.relative_to(root).parts[0]
        if folder in EXCLUSIVE_FOLDERS:
            own = item.get_closest_marker("xdist_group")
            if own is not None and own.args[:1] != (folder,):
                raise pytest.UsageError(f"{item.nodeid}: tests under {folder}/ run in xdist group {folder!r}")
            item.add_marker(pytest.mark.xdist_group(folder))
