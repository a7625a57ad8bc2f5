"""Which writer records a run (:func:`run_writer`): with ``train.log_to`` set, one that
feeds the trackers too (:class:`~localsgd.trackers.writer.TrackedWriter`), with the names
and the place (:func:`destination`) a study's runs are grouped under."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from localsgd import trackers
from localsgd.algorithms.base import format_value
from localsgd.records.record import RunWriter
from localsgd.records.store import Store
from localsgd.run.config import RunConfig
from localsgd.trackers.writer import TrackedWriter

log = logging.getLogger(__name__)


def run_writer(config: RunConfig, run_dir: Path | None) -> RunWriter:
    """The writer of ``config``'s record in ``run_dir`` (None: a rank that records nothing),
    feeding ``train.log_to``'s trackers as well when there are any."""
    if run_dir is None or not config.train.log_to:
        return RunWriter(run_dir)
    params = {**config.to_dict(), "run_id": config.run_id()}
    return TrackedWriter(run_dir, config.train.log_to, params, destination(config, run_dir))


def destination(config: RunConfig, run_dir: Path) -> trackers.Destination:
    """Where ``config``'s run in ``run_dir`` is tracked: a run of a store
    (``<store>/runs/<id>[.partial]``) into the store's ``trackers/``, grouped by the study
    that owns the store; a run elsewhere into its own folder's ``trackers/``."""
    store_root = run_dir.parent.parent
    study = None
    if run_dir.parent.name == "runs" and (store_root / "index.sqlite").is_file():
        root = store_root / trackers.FOLDER
        try:
            study = Store(store_root, create=False).owner()
        except Exception as exc:  # an unreadable owner only loses the grouping
            log.warning("trackers: the study owning %s is unknown (%s)", store_root, exc)
    else:
        root = run_dir / trackers.FOLDER
    run_id = config.run_id()
    name = f"{variant(config)} K={config.workers} lr={config.optimizer.lr:g} seed={config.seed}"
    return trackers.Destination(
        root=root,
        run_id=run_id,
        run_name=name,
        study=study,
        group=study or config.name,
        folder=f"{_slug(name)}-{run_id}",
    )


def variant(config: RunConfig) -> str:
    """The algorithm's label as the report gives it (``local_sgd H=4``), a ``<x>_epoch``
    field as given (``switch_step=2.5ep``: its step depends on the workload's size)."""
    given = {
        key.removesuffix("_epoch") + "_step": f"{format_value(value)}ep"
        for key, value in config.algorithm.items()
        if key.endswith("_epoch")
    }
    try:
        return config.algorithm_config(steps_per_epoch=0).label(shown=given)
    except ValueError:
        return str(config.algorithm.get("name"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")[:80]
