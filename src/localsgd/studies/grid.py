"""Study files: a base run config and grids whose product is the list of runs.

::

    [study]
    name = "demo"

    [base]                      # a run config: defaults for every run
    workload = "mnist1d_cnn"
    [base.train]
    epochs = 10

    [[grid]]                    # one block of runs: the product of its lists
    workers = [1]
    seed = [0, 1, 2]

    [[grid]]
    workers = [4]
    seed = [0, 1, 2]
    global_batch = 256          # held fixed: data.batch_size = 256 / workers
    algorithm = [{name = "minibatch_sgd"}, {name = "local_sgd", period = 4}]
    [grid.optimizer]
    lr = [0.05, 0.1]

A ``[grid.search]`` table makes each point of its block a metaparameter search of
``trials`` runs at quasi-random points (:mod:`localsgd.studies.search`).

Inside a grid, a list is an axis (a field that is itself a list, such as
``schedule.milestones``, takes a list of lists); anything else is a setting of that block.
``global_batch`` holds the global batch fixed across worker counts (the per-worker batch is
derived and the run records ``fixed = "global_batch"``); without it the per-worker batch is
what stays fixed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localsgd.run.config import RunConfig, normalize, run_config
from localsgd.run.loading import apply_overrides, parse_override
from localsgd.studies import search
from localsgd.studies.estimate import EstimateSection
from localsgd.util.checks import ConfigError, check_name, from_dict
from localsgd.util.nest import deep_copy, flatten, set_dotted

LIST_FIELDS = {"schedule.milestones"}


@dataclass(frozen=True)
class StudySection:
    """``[study]``: what the study is called and where it writes."""

    name: str = "study"
    """Name, used for the default output folder ``studies_out/<name>``."""
    out: str | None = None
    """The store folder; ``localsgd study --out`` overrides it."""
    description: str = ""
    """A sentence for the report header."""
    target: dict[str, str] = field(default_factory=dict)
    """Per workload, the result its steps-to-result are measured at, ``METRIC=VALUE`` (or a
    bare value of the primary metric): ``{ mnist1d_cnn = "accuracy=0.95" }``. ``localsgd
    report --target`` overrides it."""
    estimate: EstimateSection | None = None
    """``[study.estimate]``: wall-clock estimates of the runs before they run, on a named
    cluster (:mod:`localsgd.studies.estimate`; shown by ``--dry-run``)."""

    def __post_init__(self) -> None:
        check_name("study.name", self.name)
        if self.out is not None and not self.out:
            raise ConfigError("study.out must be a folder path, got ''")
        for workload, text in self.target.items():
            if not isinstance(text, str):
                raise ConfigError(f"study.target.{workload} must be a string METRIC=VALUE, got {text!r}")


@dataclass
class Stage:
    """One stage of a study: its runs, or the templates its runs are made from."""

    name: str
    runs: list[RunConfig] = field(default_factory=list)
    """The runs that do not depend on an earlier stage (made once)."""
    source: str | None = None
    """The earlier stage whose exported models the templates start from."""
    templates: list[RunConfig] = field(default_factory=list)
    """Runs made once per completed run of ``source``: the stand-in (:attr:`standin`) in
    place of that run's exported model."""
    standin: str = ""
    """The placeholder path the templates hold where the exported model goes."""
    trials: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Search entries by run id (of a template: by the template's id)."""


@dataclass
class Study:
    section: StudySection
    runs: list[RunConfig] = field(default_factory=list)
    """Every run (of a study in stages: the runs of its first stage)."""
    trials: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per run id of a search's trial: ``{"block": "grid[i]", "trial": i, "keys": [...]}``
    (the searched config keys), written to the study's plan for the report."""
    stages: list[Stage] = field(default_factory=list)
    """A study in stages: its stages in order (empty otherwise); a later stage's runs are
    built once the stage it starts from has finished (:mod:`localsgd.studies.stages`)."""

    def default_out(self) -> Path:
        return Path(self.section.out or Path("studies_out") / self.section.name)


def load_grid(data: dict[str, Any], overrides: list[str] | None = None) -> Study:
    """A parsed study file of ``[study]``, ``[base]`` and ``[[grid]]`` tables (a study in
    stages is read by :func:`localsgd.studies.stages.load_stages`; either through
    :func:`localsgd.studies.loading.load_study`); ``overrides`` (``key=value``) apply to
    ``[base]``."""
    unknown = set(data) - {"study", "base", "grid"}
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {sorted(unknown)}; allowed: ['base', 'grid', 'stage', 'study']"
        )
    section = from_dict(StudySection, data.get("study", {}), "study")
    runs, trials = expand_blocks(data.get("base", {}), data.get("grid", [{}]), section.name, overrides or [])
    return Study(section, runs, trials)


def _check_grids(grids: Any, where: str) -> None:
    if not isinstance(grids, list) or not all(isinstance(g, Mapping) for g in grids):
        raise ConfigError(f"{where}grid must be an array of tables ([[{where}grid]] blocks)")
    if not grids:
        raise ConfigError(
            f"{where}grid is an empty array: give at least one [[{where}grid]] block "
            f"(or leave it out for [{where}base] alone)"
        )


def expand_blocks(
    base: Any, grids: Any, study: str, overrides: list[str], where: str = ""
) -> tuple[list[RunConfig], dict[str, dict[str, Any]]]:
    """The runs of a ``[base]`` and its ``[[grid]]`` blocks (each run once, in order) and
    the search entries of those that are trials; ``where`` prefixes the keys errors name
    (``stage[1].``)."""
    if not isinstance(base, Mapping):
        raise ConfigError(f"{where}base must be a table of run settings, got {type(base).__name__}")
    base = apply_overrides(normalize(base), overrides)
    try:
        run_config(base)  # the base alone must be a valid run
    except ConfigError as exc:
        raise ConfigError(f"{where}base: {exc}" if where else str(exc)) from None
    _check_grids(grids, where)
    runs: list[RunConfig] = []
    trials: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    overridden = [".".join(parse_override(text)[0]) for text in overrides]
    for i, grid in enumerate(grids):
        grid = dict(grid)
        block = f"{where}grid[{i}]"
        space = search.parse(grid.pop("search"), block) if "search" in grid else None
        flat = _flatten(grid)
        for key in overridden:
            shadow = [p for p in flat if p == key or key.startswith(p + ".")]
            if shadow:
                raise ConfigError(
                    f"--set {key} changes [{where}base], but {block} sets {shadow[0]!r} for its "
                    "runs, which wins; edit the grid instead"
                )
        for run, trial in _expand_search(base, grid, block, study, space):
            if run.run_id() not in seen:
                seen.add(run.run_id())
                runs.append(run)
                if trial is not None:
                    trials[run.run_id()] = trial
    return runs, trials


def _expand_search(
    base: Mapping[str, Any], grid: Mapping[str, Any], where: str, study: str, space: search.Search | None
) -> list[tuple[RunConfig, dict[str, Any] | None]]:
    """The block's runs; with a search, each grid point's ``trials`` runs, the searched
    keys set to the trial's point."""
    if space is None:
        return [(run, None) for run in expand(base, grid, where, study)]
    flat = _flatten(grid)
    for path in space.paths:
        clash = [p for p in flat if p == path or path.startswith(p + ".") or p.startswith(path + ".")]
        if clash:
            raise ConfigError(
                f"{where}.search.{path} is searched, but {where} also sets {clash[0]!r}; set it in one place"
            )
    out: list[tuple[RunConfig, dict[str, Any] | None]] = []
    for run in expand(base, grid, where, study):
        for i, point in enumerate(space.points()):
            tree = run.to_dict()
            for path, value in point.items():
                set_dotted(tree, path, value)
            try:
                trial = run_config(tree)
            except ConfigError as exc:
                raise ConfigError(f"{where}.search (trial {i}): {exc}") from None
            out.append((trial, {"block": where, "trial": i, "keys": space.paths}))
    return out


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    # ``algorithm`` is a table-valued field: set whole, unless a table of lists spreads axes.
    return flatten(
        data,
        lists_as_json=False,
        whole=lambda path, table: (
            path == "algorithm" and not any(isinstance(v, list) for v in table.values())
        ),
    )


def _is_axis(path: str, value: Any) -> bool:
    if not isinstance(value, list):
        return False
    if path in LIST_FIELDS:
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def expand(base: Mapping[str, Any], grid: Mapping[str, Any], where: str, study: str) -> list[RunConfig]:
    """The runs of one grid block: ``base`` updated by each point of the block's product."""
    flat = _flatten(grid)
    global_batch = flat.pop("global_batch", None)
    if global_batch is not None and (
        not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1
    ):
        raise ConfigError(f"{where}.global_batch must be an integer >= 1, got {global_batch!r}")
    axes = {p: v for p, v in flat.items() if _is_axis(p, v)}
    settings = {p: v for p, v in flat.items() if p not in axes}
    for path, values in axes.items():
        if not values:
            raise ConfigError(f"{where}.{path} is an empty list: a grid axis needs at least one value")
    runs = []
    for point in itertools.product(*axes.values()):
        tree = deep_copy(base)
        tree.setdefault("name", study)
        for path, value in [*settings.items(), *zip(axes, point)]:
            _set_point(tree, path, value, where)
        if global_batch is not None:
            _fix_global_batch(tree, global_batch, where)
        try:
            runs.append(run_config(tree))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return runs


def _set_point(tree: dict[str, Any], path: str, value: Any, where: str) -> None:
    """One key of a grid point set into a run's config tree."""
    if path == "algorithm" and not isinstance(value, Mapping):
        raise ConfigError(
            f'{where}.algorithm values must be tables like {{name = "local_sgd", period = 8}}, got {value!r}'
        )
    if path == "workload" and isinstance(value, str):
        path = "workload.name"  # a name keeps the workload options of [base]
    set_dotted(tree, path, deep_copy(value) if isinstance(value, Mapping) else value)


def _fix_global_batch(tree: dict[str, Any], global_batch: int, where: str) -> None:
    """``global_batch`` held fixed: each worker's batch is its share of it."""
    workers = tree.get("workers", 1)
    if not isinstance(workers, int) or global_batch % workers:
        raise ConfigError(f"{where}.global_batch = {global_batch} is not divisible by workers = {workers!r}")
    set_dotted(tree, "data.batch_size", global_batch // workers)
    tree["fixed"] = "global_batch"
