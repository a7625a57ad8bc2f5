"""Studies in stages: a later stage starts from the models an earlier stage's runs exported.

STILT (continued pretraining, then fine-tuning) is two studies in a row: the fine-tuning
runs need the models the pretraining runs produced, which exist only once those runs have
finished. A study file of ``[[stage]]`` tables says so in one file and runs as one command::

    [study]
    name = "stilt"

    [[stage]]
    name = "pretrain"
    [stage.base]                        # a run config, as a study's [base]
    workload = { name = "mlm", ... }
    [[stage.grid]]                      # blocks, as a study's [[grid]]
    workers = [1, 2, 4]

    [[stage]]
    name = "finetune"
    [stage.base]
    workload = { name = "classification", model = { path = { from_stage = "pretrain" } }, ... }
    [[stage.grid]]
    seed = [0, 1, 2]

A value ``{ from_stage = "NAME" }`` (anywhere in a stage's base or grids; one earlier stage
per stage) stands for the folder of the model a run of stage NAME exported (``RUN/model``,
:mod:`localsgd.workloads.text.export`): each run of the stage that holds it is made once per
*completed* run of stage NAME, with that run's folder in its place and its id in the run's
``from_run = {stage, run_id}``. A grid axis may mix it with fixed values (``path = [{
from_stage = "pretrain" }, "models/bert"]``: the fine-tuning of the model the first stage
started from is then a run of its own). Runs of a stage without such a value are made once.

Everything is checked when the file is read: a later stage is expanded with a stand-in for
the exported folder, so a typo fails before the first stage trains. The stages run in order
into one store; a stage's runs are built when the stages before it have finished. A run of
the first stage that failed, diverged or exported no model has no runs in the later stage:
they are skipped, and the plan (``plan.json``: ``stages``, ``skipped``, each run's
``stage``) and the report say so. Rerunning the study skips the finished runs of every
stage: the later stage's runs are built again, with the same ids.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from localsgd.records.store import Store
from localsgd.run.config import RunConfig, run_config
from localsgd.studies.grid import Stage, Study, StudySection, expand_blocks
from localsgd.util.checks import ConfigError, check_name, from_dict
from localsgd.workloads.text.export import exported_model

REFERENCE = "from_stage"
"""The key of a reference to an earlier stage's exported models."""
STAGE_KEYS = ("name", "base", "grid")


@dataclass(frozen=True)
class Skipped:
    """A run of an earlier stage whose later-stage runs were not made, and why."""

    stage: str
    source: str
    run_id: str
    reason: str
    runs: int
    """How many runs of ``stage`` it would have had."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "from_stage": self.source,
            "run_id": self.run_id,
            "reason": self.reason,
            "runs": self.runs,
        }


# -- reading a study file of stages ------------------------------------------------------------


def load_stages(data: Mapping[str, Any], overrides: list[str]) -> Study:
    """A study of ``[[stage]]`` tables (see the module docstring); ``overrides`` apply to
    every stage's base. ``ConfigError`` naming the key (``stage[1].grid[0]...``)."""
    unknown = set(data) - {"study", "stage"}
    if unknown:
        raise ConfigError(
            f"a study of [[stage]] tables has no top-level {sorted(unknown)}: each stage has its own "
            "base and grid ([stage.base], [[stage.grid]])"
        )
    section = from_dict(StudySection, data.get("study", {}), "study")
    tables = data["stage"]
    if not isinstance(tables, list) or not tables or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError("stage must be an array of tables ([[stage]] blocks), at least one")
    stages: list[Stage] = []
    workdir = Path(tempfile.mkdtemp(prefix="localsgd-stages-"))
    try:
        for i, table in enumerate(tables):
            stages.append(_load_stage(i, table, stages, section.name, overrides, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    first = stages[0]
    return Study(section, list(first.runs), dict(first.trials), stages)


def _load_stage(
    i: int, table: Mapping[str, Any], before: list[Stage], study: str, overrides: list[str], workdir: Path
) -> Stage:
    where = f"stage[{i}]"
    unknown = set(table) - set(STAGE_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{where}.{k}' for k in sorted(unknown)]}; allowed: {list(STAGE_KEYS)}"
        )
    name = table.get("name")
    if name is None:
        raise ConfigError(f"missing key '{where}.name': every stage has a name")
    check_name(f"{where}.name", name)
    if any(s.name == name for s in before):
        raise ConfigError(f"{where}.name = {name!r} names an earlier stage too; stage names are unique")
    references: dict[str, str] = {}
    base = _replace_references(table.get("base", {}), f"{where}.base", references)
    grids = _replace_references(table.get("grid", [{}]), f"{where}.grid", references)
    sources = set(references.values())
    if len(sources) > 1:
        raise ConfigError(f"{where} refers to several stages {sorted(sources)}; a stage starts from one")
    source = sources.pop() if sources else None
    if source is not None and source not in [s.name for s in before]:
        key = next(k for k, v in references.items())
        earlier = [s.name for s in before]
        raise ConfigError(
            f"{key} = {{ {REFERENCE} = {source!r} }}: no earlier stage is called {source!r}"
            + (f" (earlier: {earlier})" if earlier else " (the first stage starts from nothing)")
        )
    standin = ""
    if source is not None:
        folder = workdir / f"model-of-{source}"
        folder.mkdir(exist_ok=True)
        for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (folder / file).write_text("{}")
        standin = str(folder)
        base, grids = _fill(base, standin), _fill(grids, standin)
    runs, trials = expand_blocks(base, grids, study, overrides, f"{where}.")
    stage = Stage(name, source=source, standin=standin, trials=trials)
    for run in runs:
        (stage.templates if standin and _holds(run.to_dict(), standin) else stage.runs).append(run)
    return stage


class _Reference:
    """A ``{ from_stage = NAME }`` value while the file is read."""

    def __init__(self, stage: str) -> None:
        self.stage = stage


def _replace_references(value: Any, where: str, found: dict[str, str]) -> Any:
    """``value`` with every ``{ from_stage = NAME }`` replaced by a marker; ``found``
    gets each one's key and stage."""
    if isinstance(value, Mapping):
        if REFERENCE in value:
            stage = value[REFERENCE]
            if set(value) != {REFERENCE} or not isinstance(stage, str) or not stage:
                raise ConfigError(
                    f'{where} = {dict(value)!r}: a reference to an earlier stage is {{ {REFERENCE} = "NAME" }}'
                )
            found[where] = stage
            return _Reference(stage)
        return {k: _replace_references(v, f"{where}.{k}", found) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_references(v, f"{where}[{j}]", found) for j, v in enumerate(value)]
    return value


def _fill(value: Any, standin: str) -> Any:
    if isinstance(value, _Reference):
        return standin
    if isinstance(value, Mapping):
        return {k: _fill(v, standin) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, standin) for v in value]
    return value


def _holds(value: Any, text: str) -> bool:
    if isinstance(value, Mapping):
        return any(_holds(v, text) for v in value.values())
    if isinstance(value, list):
        return any(_holds(v, text) for v in value)
    return value == text


def _put(value: Any, standin: str, path: str) -> Any:
    if isinstance(value, Mapping):
        return {k: _put(v, standin, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_put(v, standin, path) for v in value]
    return path if value == standin else value


# -- building a later stage's runs -------------------------------------------------------------


def model_path(out: Path, run_id: str) -> Path:
    """Where the run ``run_id`` of the store ``out`` left its exported model (as ``out``
    is written: relative stays relative)."""
    from localsgd.workloads.text.export import MODEL_FOLDER

    return Path(out) / "runs" / run_id / MODEL_FOLDER


def build_stage(
    stage: Stage, sources: Sequence[RunConfig], store: Store | None, out: Path
) -> tuple[list[RunConfig], dict[str, dict[str, Any]], list[Skipped]]:
    """The runs of ``stage`` now that its source stage has finished (its ``sources`` are
    that stage's runs, recorded in ``store``): the fixed runs, then for each completed
    source run with an exported model its templates filled in. Returns the runs, their
    search entries and the source runs skipped (failed, diverged, unfinished, no model)."""
    runs = list(stage.runs)
    trials = {rid: t for rid, t in stage.trials.items() if any(r.run_id() == rid for r in runs)}
    skipped: list[Skipped] = []
    if stage.source is None:
        return runs, trials, skipped
    for source in sources:
        rid = source.run_id()
        reason = _unusable(store, rid)
        if reason is not None:
            skipped.append(Skipped(stage.name, stage.source, rid, reason, len(stage.templates)))
            continue
        path = str(model_path(out, rid))
        for template in stage.templates:
            tree = _put(template.to_dict(), stage.standin, path)
            tree["from_run"] = {"stage": stage.source, "run_id": rid}
            try:
                run = run_config(tree)
            except ConfigError as exc:
                raise ConfigError(f"stage {stage.name!r} from run {rid}: {exc}") from None
            runs.append(run)
            if template.run_id() in stage.trials:
                trials[run.run_id()] = stage.trials[template.run_id()]
    return runs, trials, skipped


def _unusable(store: Store | None, run_id: str) -> str | None:
    """Why the run's model cannot start a later stage's runs, or None when it can."""
    status = store.status(run_id) if store is not None else None
    if status is None or status == "running":
        return "not finished"
    if status != "completed":
        error = store.error(run_id) if store is not None else None
        return f"{status}: {error.line()}" if error is not None else status
    assert store is not None
    if exported_model(store.run_dir(run_id)) is None:
        return "completed without an exported model (its workload exports none)"
    return None


# -- running ---------------------------------------------------------------------------------


def plan_of(
    study: Study,
    built: Mapping[str, tuple[list[RunConfig], dict[str, dict[str, Any]]]],
    skipped: Sequence[Skipped],
) -> dict[str, Any]:
    """The store's ``plan.json`` of a study in stages: the runs built so far (each with its
    stage), the stages (which starts from which; runs per source run) and the skipped."""
    runs = []
    for stage in study.stages:
        made, trials = built.get(stage.name, ([], {}))
        for run in made:
            trial = trials.get(run.run_id())
            runs.append(
                {
                    "run_id": run.run_id(),
                    **run.to_dict(),
                    "stage": stage.name,
                    **({"search": trial} if trial else {}),
                }
            )
    return {
        "study": study.section.name,
        "description": study.section.description,
        "target": dict(study.section.target),
        "runs": runs,
        "stages": [
            {
                "name": stage.name,
                "from_stage": stage.source,
                "runs": len(built[stage.name][0]) if stage.name in built else None,
                "fixed_runs": len(stage.runs),
                "runs_per_source_run": len(stage.templates),
            }
            for stage in study.stages
        ],
        "skipped": [s.to_dict() for s in skipped],
    }


def run_stages(
    study: Study,
    out: Path,
    *,
    run: Callable[..., Counter[str]],
    progress: bool = True,
    output: TextIO | None = None,
    **options: Any,
) -> Counter[str]:
    """Run the stages of ``study`` in order into the store ``out``, each through ``run``
    (:func:`~localsgd.studies.runner.run_study`, with ``options``); returns how many runs
    ended in each status, with ``skipped (earlier stage)`` for the runs never made."""
    import sys

    say = (output or sys.stdout).write if progress else (lambda text: 0)
    counts: Counter[str] = Counter()
    built: dict[str, tuple[list[RunConfig], dict[str, dict[str, Any]]]] = {}
    skipped: list[Skipped] = []
    for number, stage in enumerate(study.stages, 1):
        store = (
            Store(out, create=False)
            if stage.source is not None and (Path(out) / "index.sqlite").is_file()
            else None
        )
        runs, trials, passed = build_stage(stage, built[stage.source][0] if stage.source else [], store, out)
        built[stage.name] = (runs, trials)
        skipped += passed
        say(f"stage {number}/{len(study.stages)} {stage.name}: {len(runs)} run(s)")
        if stage.source is not None:
            say(f" from the models of stage {stage.source}")
        say("\n")
        for s in passed:
            say(
                f"  {s.runs} run(s) of stage {s.stage} skipped: run {s.run_id} of stage {s.source} {s.reason}\n"
            )
            counts["skipped (earlier stage)"] += s.runs
        part = Study(study.section, runs, trials)
        counts.update(
            run(part, out, plan=plan_of(study, built, skipped), progress=progress, output=output, **options)
        )
    return counts


def plan_lines(study: Study) -> list[str]:
    """``--dry-run`` of a study in stages: each stage's runs (a later stage's as the runs
    made per completed run of its source, the exported model shown as ``<model of a run of
    NAME>``)."""
    from localsgd.studies.progress import plan_lines as lines_of

    out: list[str] = []
    first = len(study.stages[0].runs)
    sources = {study.stages[0].name: first}
    for stage in study.stages:
        if stage.source is None:
            sources[stage.name] = len(stage.runs)
            out.append(f"stage {stage.name}: {len(stage.runs)} run(s)")
            out += [f"  {line}" for line in lines_of(stage.runs)]
            continue
        most = sources.get(stage.source, 0)
        total = len(stage.runs) + most * len(stage.templates)
        sources[stage.name] = total
        out.append(
            f"stage {stage.name}: {len(stage.templates)} run(s) for each completed run of stage {stage.source} "
            f"(up to {most * len(stage.templates)})"
            + (f" and {len(stage.runs)} more" if stage.runs else "")
            + f", made once stage {stage.source} has finished"
        )
        placeholder = f"<model of a run of {stage.source}>"
        for line in lines_of([*stage.templates, *stage.runs]):
            run_id, _, rest = line.partition("  ")
            template = any(t.run_id() == run_id for t in stage.templates)
            shown = rest.replace(stage.standin, placeholder)
            out.append(f"  {'per run' if template else run_id}  {shown}")
    return out


def total_runs(study: Study) -> int:
    """Runs planned at most (a later stage's: one set per run of its source stage)."""
    made: dict[str, int] = {}
    for stage in study.stages:
        made[stage.name] = len(stage.runs) + (
            made.get(stage.source, 0) * len(stage.templates) if stage.source else 0
        )
    return sum(made.values())
