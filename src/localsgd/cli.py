"""The ``localsgd`` command: train one run, run a study, report on a store."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from localsgd.costmodel import presets as cluster_presets
from localsgd.records.store import DEFAULT_RUN_STORE
from localsgd.util.files import EXIT_DISK_FULL

if TYPE_CHECKING:
    from localsgd.emulation import EmulatedCluster
    from localsgd.run.config import RunConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Plain help: rich markup would swallow the TOML table names ([study], [[grid]]).
    rich_markup_mode=None,
    help="Communication-efficient data-parallel training: run, sweep and report local SGD and its family.",
)

def _print_version(value: bool) -> None:
    if value:
        from localsgd import __version__

        typer.echo(f"localsgd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Communication-efficient data-parallel training: run, sweep and report local SGD and its family."""


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set algorithm.period=16 (repeatable)."),
]


INCOMPLETE = 3
"""``localsgd report``'s exit code when the report is written without some runs or rows."""


DISK_FULL = EXIT_DISK_FULL
"""``localsgd train`` and ``study``'s exit code when a file could not be written for want of
space: the run in progress is left unfinished, resumable once space is freed."""


@contextlib.contextmanager
def _full_disk_stops(advice: Callable[[], str]) -> Iterator[None]:
    """A full disk in the block (here or in a worker) ends the command with one line naming
    the file, ``advice`` after it, and exit code :data:`DISK_FULL`."""
    from localsgd.util.files import DiskFull, no_space

    try:
        yield
    except (DiskFull, OSError) as exc:
        if not no_space(exc):
            raise
        path = exc.path if isinstance(exc, DiskFull) else getattr(exc, "filename", None) or "?"
        typer.secho(
            f"error: no space left on device (ENOSPC) writing {path}: {advice()}", fg=typer.colors.RED, err=True
        )
        raise typer.Exit(code=DISK_FULL) from None


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


_STOPPED_BY: list[int] = []


@contextlib.contextmanager
def _stopping_in_order() -> Iterator[None]:
    """For the block, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread once, so
    that a study or run stops in order (workers stopped, the run in progress left
    unfinished, resumable); further signals are ignored while it stops (SIGKILL still ends
    it, and its workers). The previous handlers come back after the block."""

    def handler(signum: int, frame: FrameType | None) -> None:
        _STOPPED_BY.append(signum)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may handle signals
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _interrupted(what: str) -> typer.Exit:
    signum = _STOPPED_BY[0] if _STOPPED_BY else signal.SIGINT
    typer.secho(
        f"{what} stopped by {signal.Signals(signum).name}: its workers are stopped and the run in "
        "progress is left unfinished; run the same command again to resume it from its last checkpoint",
        fg=typer.colors.RED,
        err=True,
    )
    return typer.Exit(code=128 + signum)


def _resumed_run(run_dir: Path, overrides: list[str]) -> tuple[RunConfig, Path]:
    """The run config and store of ``localsgd train --resume RUN_DIR``."""
    from localsgd.records.store import Store
    from localsgd.run.loading import load_run_config
    from localsgd.util.checks import ConfigError

    if not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"--resume {str(run_dir)!r} is not a run folder (no config.json inside); give "
            "STORE/runs/<id>.partial (a run left unfinished) or STORE/runs/<id> (a failed one)"
        )
    root = run_dir.absolute().parent.parent
    run_id = run_dir.name.removesuffix(".partial")
    if not (root / "index.sqlite").is_file():
        raise ConfigError(f"--resume {str(run_dir)!r} is not inside a store (no {root / 'index.sqlite'})")
    run = load_run_config(run_dir / "config.json", overrides)
    if run.run_id() != run_id:
        raise ConfigError(
            f"--resume {str(run_dir)!r}: the run's config (with --set) has id {run.run_id()}, not {run_id}; "
            "--resume continues a run as it was configured (only train.timeout_seconds, "
            "train.checkpoint_every and train.max_restarts may change)"
        )
    status = Store(root, create=False).status(run_id)
    if status in ("completed", "diverged") and not run_dir.name.endswith(".partial"):
        raise ConfigError(f"--resume {str(run_dir)!r}: the run is {status}; there is nothing to resume")
    return run, root


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="Run config (TOML).", show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Store to record the run in.")] = Path(DEFAULT_RUN_STORE),
    overrides: SetOption = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run left unfinished (STORE/runs/ID.partial) or failed (STORE/runs/ID) in "
            "this folder from its last checkpoint, instead of a config; the store is the folder's.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train one run and write its record (config, environment, metrics, checkpoint, status).

    Starts `workers` processes through torch's elastic launcher, unless already running
    under torchrun (then this process is one of the workers, and rank 0 records the run).
    Prints rank 0's evaluations as they come, then the final metric and the run folder.
    A run of the same config starts again from step 0 (a warning line says what of it the
    store held: a checkpoint, a finished record); --resume continues one.
    Exit code: 0 completed, 1 failed or diverged, 2 a bad config, store or option,
    4 the disk filled up (one line names the file; the run is left unfinished, --resume
    continues it), 130/143 stopped by SIGINT/SIGTERM (the run is left unfinished, resumable).
    """
    from localsgd.util.checks import ConfigError

    try:
        run, out = _train_config(config, out, overrides or [], resume)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if _inside_torchrun():
        from localsgd.run import worker

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        argv = [str(config), "--out", str(out)]
        for item in overrides or []:
            argv += ["--set", item]
        raise typer.Exit(code=worker.main(argv))
    # The evaluations are printed from the record, whichever process trains the run.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    from localsgd import workloads
    from localsgd.run.checkpoints import verify
    from localsgd.run.execute import execute_run, open_run_store, preflight
    from localsgd.studies.progress import follow_rows, primary_value, row_line, run_label

    run_id = run.run_id()
    try:
        with (
            _stopping_in_order(),
            _full_disk_stops(lambda: _train_advice(out, run_id)),
            contextlib.ExitStack() as held,
        ):
            workload = next(iter(preflight([run]).values()))
            store = open_run_store(out, run)
            held.enter_context(store.run_lock(run_id))
            if resume is None:
                _say_what_is_redone(store, run_id)
            else:
                folder = store.resumable(run_id)
                step = verify(folder, run_id) if folder is not None else None
                typer.echo(
                    f"resuming from the checkpoint of step {step}"
                    if step
                    else "no checkpoint to resume from: the run starts again from step 0"
                )
            metric = workloads.metric(workload)
            typer.echo(f"run {run_id}: {run_label(run)} ({run.engine} engine)")
            with follow_rows(
                [store.partial_dir(run_id) / "metrics.jsonl", store.run_dir(run_id) / "metrics.jsonl"],
                lambda row: typer.echo(row_line(row, metric)),
            ):
                status = execute_run(run, store, workload=workload, resume=resume is not None)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _interrupted(f"run {run_id}") from None
    _print_result(store, run_id, status, primary_value, metric)


def _train_advice(out: Path, run_id: str) -> str:
    """What to do after a full disk stopped ``localsgd train``: continue the run from its
    checkpoint when it has one, else run it again."""
    from localsgd.records import Store

    with contextlib.suppress(Exception):
        folder = Store(out, create=False).resumable(run_id)
        if folder is not None:
            return f"free space and rerun with --resume {folder} to continue from its last checkpoint"
    return "free space and rerun the same command"


def _say_what_is_redone(store: Any, run_id: str) -> None:
    """A warning line (stderr) for what of run ``run_id`` the store holds that a run started
    afresh drops: a checkpoint ``--resume`` could continue from, or a finished record."""
    from localsgd.records import RecordError

    try:
        folder = store.resumable(run_id)
    except RecordError:
        folder = None  # an unreadable status: said below as a finished record
    final = store.run_dir(run_id)
    if folder is not None:
        what = f"its checkpoint is dropped and the run starts again from step 0 (--resume {folder} continues it)"
    elif store.partial_dir(run_id).is_dir():
        folder = store.partial_dir(run_id)
        what = "left unfinished without a checkpoint; the run starts again from step 0"
    elif final.is_dir():
        what = "the run's finished record is replaced by this run"
    else:
        return
    typer.secho(f"warning: run {run_id}: {folder or final}: {what}", fg=typer.colors.YELLOW, err=True)


def _train_config(
    config: Path | None, out: Path, overrides: list[str], resume: Path | None
) -> tuple[Any, Path]:
    """``localsgd train``'s run and store: from ``config`` with ``--set`` overrides, or the
    run left in the folder ``--resume`` names (with its store); ``ConfigError`` otherwise."""
    from localsgd.run.loading import load_run_config
    from localsgd.util.checks import ConfigError

    if resume is not None:
        if config is not None:
            raise ConfigError("give a run config or --resume RUN_DIR, not both")
        if _inside_torchrun():
            raise ConfigError("--resume runs its own workers: start it without torchrun")
        return _resumed_run(resume, overrides)
    if config is None:
        raise ConfigError("a run config is required (or --resume RUN_DIR)")
    return load_run_config(config, overrides), out


def _print_result(store: Any, run_id: str, status: str, primary_value: Any, metric: Any) -> None:
    """The run's outcome as ``localsgd train`` prints it; exit code 1 unless it completed."""
    from localsgd.records.record import lost_line

    info = store.final_status(run_id)
    steps = f" after {info.steps} steps ({info.wall_seconds:.1f} s of training)" if info else ""
    lost = lost_line(info)
    typer.echo(f"{status}{', ' + lost if lost else ''}: {primary_value(info, metric)}{steps}")
    typer.echo(f"run folder: {store.run_dir(run_id)}")
    error = info.error if info is not None else None
    if error is not None:
        typer.secho(f"error: {error.line()}", fg=typer.colors.RED, err=True)
    if status != "completed":
        raise typer.Exit(code=1)


def _options(items: list[str] | None, flag: str) -> dict[str, object]:
    """``KEY=VALUE`` items as a dict; a value is JSON when it parses (numbers, true/false,
    objects), else a string."""
    import json

    options: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _fail(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


@app.command()
def study(
    config: Annotated[Path, typer.Argument(help="Study file (TOML): [study], [base] and [[grid]] blocks.")],
    out: Annotated[
        Path | None, typer.Option(help="Store folder (default: [study].out or studies_out/<name>).")
    ] = None,
    overrides: SetOption = None,
    retry_failed: Annotated[bool, typer.Option(help="Run failed and diverged runs again.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List the planned runs and stop.")] = False,
    parallel: Annotated[
        int | None,
        typer.Option(
            help="Runs at once (default: 1 here, every run under --executor slurm). On this machine "
            "N x workers x threads must fit in the cores.",
            show_default=False,
        ),
    ] = None,
    oversubscribe: Annotated[
        bool, typer.Option(help="Let --parallel runs need more threads than there are cores.")
    ] = False,
    executor: Annotated[
        str,
        typer.Option(help="Where runs go: local (worker pools on this machine) or slurm (a job per run)."),
    ] = "local",
    batch_trials: Annotated[
        int,
        typer.Option(
            help="Runs that differ only in optimizer lr/momentum/weight decay, schedule and seed "
            "train together, this many at most, on an engine that declares trial_batching "
            "(see localsgd engines); "
            "1 runs each alone.",
        ),
    ] = 64,
    slurm: Annotated[
        list[str] | None,
        typer.Option(
            "--slurm",
            help="A submitit/Slurm option as KEY=VALUE, e.g. slurm_partition=gpu, timeout_min=120, "
            "nodes=2, cluster=local (repeatable; see docs/slurm.md).",
        ),
    ] = None,
    adopt_store: Annotated[
        bool,
        typer.Option(
            help="Take over a store written by another study (or by localsgd train): it becomes this "
            "study's, and the runs already finished in it stay there and in its reports."
        ),
    ] = False,
) -> None:
    """Run every run of a study's grid; rerunning skips finished runs and resumes unfinished ones.

    The study holds its store's lock while it runs (a second study or a localsgd train into
    it is refused), and the store belongs to the study. Prints a line per finished run (a
    progress bar in a terminal) and a summary. Exit code: 0 every run completed, 1 some
    failed or diverged, 2 a bad study file, option or store, 4 the disk filled up (one line
    names the file; the run in progress is left unfinished, and rerunning the command once
    there is space resumes it), 130/143 stopped by SIGINT/SIGTERM (the run in progress is
    left unfinished, resumable).
    """
    from localsgd.studies.loading import load_study
    from localsgd.studies.runner import EXECUTORS, run_study
    from localsgd.util.checks import ConfigError

    if executor not in EXECUTORS:
        raise _fail(f"--executor must be one of {list(EXECUTORS)}, got {executor!r}")
    if slurm and executor != "slurm":
        raise _fail("--slurm options need --executor slurm")
    options = _options(slurm, "--slurm")
    try:
        plan = load_study(config, overrides or [])
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    folder = out or plan.default_out()
    if dry_run:
        _print_plan(plan, folder)
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    runner: Any = run_study
    if plan.stages:  # each stage through run_study, once the stage before it has finished
        from functools import partial

        from localsgd.studies.stages import run_stages

        runner = partial(run_stages, run=run_study)
    try:
        with _stopping_in_order(), _full_disk_stops(lambda: "free space and rerun the same command to resume"):
            counts = runner(
                plan,
                folder,
                study_file=config,
                retry_failed=retry_failed,
                parallel=parallel,
                oversubscribe=oversubscribe,
                executor=executor,
                executor_options=options,
                adopt_store=adopt_store,
                batch_trials=batch_trials,
            )
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _interrupted(f"study {plan.section.name}") from None
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    bad = sum(n for status, n in counts.items() if "failed" in status or "diverged" in status)
    typer.echo(f"study {plan.section.name}: {summary}; store: {folder}")
    if bad:
        typer.secho(
            f"{bad} of {sum(counts.values())} runs failed or diverged (their errors are in the "
            f"lines above and in `localsgd report {folder}`); --retry-failed runs them again",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)


def _print_plan(plan: Any, folder: Path) -> None:
    """``--dry-run``: a line per planned run, with its estimate when the study has
    ``[study.estimate]``, and the total."""
    from localsgd.studies import stages
    from localsgd.studies.progress import plan_lines
    from localsgd.util.checks import ConfigError

    lines = stages.plan_lines(plan) if plan.stages else plan_lines(plan.runs)
    if plan.section.estimate is not None and not plan.stages:
        from localsgd.studies.estimate import estimate_lines

        try:
            estimates = estimate_lines(plan.runs, plan.section.estimate)
        except ConfigError as exc:
            raise _fail(str(exc)) from None
        lines = [f"{line}  {estimate}" for line, estimate in zip(lines, estimates)]
    for line in lines:
        typer.echo(line)
    typer.echo(f"{stages.total_runs(plan) if plan.stages else len(plan.runs)} runs -> {folder}")


@app.command()
def report(
    store_dir: Annotated[Path, typer.Argument(help="A store folder written by `study` or `train`.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: STORE_DIR/report).")] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="Add wall-clock estimates on a cluster: a preset "
            f"({', '.join(cluster_presets())}) or a cluster TOML file (see docs/costmodel.md)."
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="A result to reach, as METRIC=VALUE (accuracy=0.9: accuracies are fractions) or a "
            "bare VALUE of the primary metric: the report adds steps-to-result (the best trial's mean "
            "over seeds of the first step that strictly crosses it on the --select-on split; default: "
            "the study's [study] target) and, "
            "with --cluster, the estimated time to it (default there: the best mean final value of "
            "each workload, 5% short of it)."
        ),
    ] = None,
    select_on: Annotated[
        str,
        typer.Option(
            help="The split targets and steps-to-result read: validation (held out of the training "
            "data; the default) or test. Tables and figures show test either way."
        ),
    ] = "validation",
    formats: Annotated[
        str,
        typer.Option("--format", help="Figure files to write, comma-separated: png, pdf, svg."),
    ] = "png,pdf,svg",
    dpi: Annotated[
        int, typer.Option(help="Resolution of the PNG figures (dots per inch, 50 to 1200).")
    ] = 200,
) -> None:
    """Tables (mean ± std over seeds), figures, report.md, report.html and results.xlsx from the store alone.

    Reads the store without its lock (while a study writes it, the runs finished so far);
    runs whose folders are missing or unreadable are listed as unreadable, not counted, and
    each is named in a warning line on stderr, as is a metrics stream whose last line was
    cut off mid-write (its last evaluation is left out).
    Exit code: 0 written, 2 not a store, a corrupt store or a bad option,
    3 written but incomplete (a warning line per run or file left out).
    """
    from localsgd.report import make_report
    from localsgd.util.checks import check_output_folder

    try:
        check_output_folder("--out", out if out is not None else store_dir / "report")
        paths = make_report(
            store_dir, out, cluster=cluster, target=target, formats=formats, dpi=dpi, select_on=select_on
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    figures = [p for kind, p in paths.items() if kind not in ("markdown", "html", "xlsx")]
    kinds = sorted({p.suffix.lstrip(".").upper() for p in figures})
    typer.echo(f"figures: {len(figures)} files ({', '.join(kinds)}) in {paths['html'].parent}")
    for kind in ("xlsx", "markdown", "html"):
        typer.echo(f"{kind}: {paths[kind]}")
    for problem in paths.problems:
        typer.secho(f"warning: {problem.line()}", fg=typer.colors.YELLOW, err=True)
    if paths.problems:
        raise typer.Exit(code=INCOMPLETE)


@app.command()
def fixtures(
    folder: Annotated[Path, typer.Argument(help="Folder to write into (created if missing).")],
    scale: Annotated[int, typer.Option(min=1, help="Multiply the number of examples.")] = 1,
) -> None:
    """Write tiny text fixtures in the real formats: a tokenizer, a tiny BERT (config and
    checkpoint), MNLI, SQuAD v1.1, a text corpus and a single-text classification set (for
    tests, the tiny studies and a first cluster check)."""
    from localsgd.util.checks import ConfigError

    if folder.exists() and not folder.is_dir():
        raise _fail(f"fixtures folder '{folder}' is a file")
    try:
        from localsgd.workloads.text.fixtures import write_fixtures

        paths = write_fixtures(folder, scale=scale)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


@app.command()
def algorithms() -> None:
    """List the registered algorithms and their hyperparameters."""
    import dataclasses

    from localsgd import algorithms as registry

    for name in registry.names():
        cls = registry.get(name)
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        typer.echo(f"{name}: {cls.__name__}({fields})")


@app.command()
def engines() -> None:
    """List the registered engines and the capabilities each declares."""
    from localsgd import engines as registry

    for name in registry.names():
        engine = registry.get(name)
        declared = [c.key for c in registry.Capability if c in engine.capabilities]
        typer.echo(f"{name}: {', '.join(declared) or '-'} -- {engine.info.description}")


@app.command()
def workloads() -> None:
    """List the registered workloads (any package.module:function works too)."""
    from localsgd import workloads as registry

    for name in registry.names():
        typer.echo(f"{name}{' (default)' if name == registry.DEFAULT else ''}")


cluster_app = typer.Typer(
    no_args_is_help=True,
    help="Emulated multi-node clusters on this machine (network namespaces, links shaped with tc; "
    "needs root): run a study or a run on one, calibrate its links for the cost model.",
)
app.add_typer(cluster_app, name="cluster")

NodesOption = Annotated[int, typer.Option(help="N: emulated nodes (network namespaces).")]
ProcsOption = Annotated[int, typer.Option(help="M: worker processes per node.")]
RateOption = Annotated[
    str | None,
    typer.Option(help="Each node's link rate, as tc writes it (100mbit, 1gbit); default: unshaped."),
]
BurstOption = Annotated[
    int | None, typer.Option(help="Token-bucket bytes of each shaped link (default: 2 ms at the rate).")
]


def _emulated_cluster(
    nodes: int, procs_per_node: int, rate: str | None, burst: int | None
) -> EmulatedCluster:
    """An EmulatedCluster (not yet up), or exit 2 with the reason it cannot be built here."""
    from localsgd.emulation import EmulatedCluster, unavailable

    why = unavailable()
    if why is not None:
        raise _fail(why)
    try:
        return EmulatedCluster(nodes, procs_per_node, rate, burst)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _write_calibration(cluster: EmulatedCluster, path: Path) -> None:
    from localsgd.costmodel import cluster_to_toml
    from localsgd.emulation import calibrate as calibrate_links

    result = calibrate_links(cluster)
    comment = "Calibrated on an emulated cluster with `localsgd cluster calibrate`:\n" + (
        f"inter-node: {result.inter.nbytes} B took {[round(t, 6) for t in result.inter.seconds]} s;\n"
        f"loopback: {result.intra.nbytes} B took {[round(t, 6) for t in result.intra.seconds]} s."
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cluster_to_toml(result.cluster, comment))
    link = result.cluster.inter
    codecs = ", ".join(f"{name} {c.encode * 1e9:.3g}/{c.decode * 1e9:.3g}" for name, c in result.cluster.codecs.items())
    typer.echo(
        f"cluster file: {path} (inter-node α = {link.alpha * 1e6:.4g} µs, "
        f"β = {link.bandwidth * 8 / 1e6:.4g} Mbit/s; codecs, encode/decode ns per value: {codecs})"
    )


@cluster_app.command()
def emulate(
    job: Annotated[Path, typer.Argument(help="A study file (study, base and grid tables) or a run config.")],
    nodes: NodesOption = 2,
    procs_per_node: ProcsOption = 2,
    rate: RateOption = None,
    burst: BurstOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Store folder (default: the study's out, or studies_out/NAME; runs for a single run)."
        ),
    ] = None,
    overrides: SetOption = None,
    calibrate: Annotated[
        Path | None,
        typer.Option(help="First probe the links and write the cluster file here (for report --cluster)."),
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option(help="Run failed and diverged runs of a study again.")
    ] = False,
) -> None:
    """Run a study or a single run on N emulated nodes × M processes: one torchrun per node,
    inside its own network namespace, `-m localsgd.worker` on every run. Runs of one process
    (K = 1, the simulated engine) run here as usual; every other run must have K = N × M.
    Everything the emulation created is removed when it ends, also on failure or interrupt."""
    from localsgd.run.execute import execute_run, open_run_store, preflight
    from localsgd.run.loading import load_run_config, load_toml
    from localsgd.studies.loading import load_study
    from localsgd.studies.runner import run_study
    from localsgd.util.checks import ConfigError

    cluster = _emulated_cluster(nodes, procs_per_node, rate, burst)
    try:
        is_study = job.suffix == ".toml" and bool({"study", "base", "grid"} & set(load_toml(job)))
        plan = load_study(job, overrides or []) if is_study else None
        runs = plan.runs if plan is not None else [load_run_config(job, overrides or [])]
        for run in runs:
            processes = run.processes()
            if processes not in (1, cluster.world_size):
                raise ConfigError(
                    f"run {run.run_id()} (workers = {run.workers}, engine = {run.engine!r}) takes "
                    f"{processes} processes; the emulated cluster runs {cluster.world_size} "
                    f"({nodes} nodes × {procs_per_node}) or one in this process"
                )
        built = preflight(runs)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    with cluster:  # it handles SIGINT/SIGTERM itself: it tears the emulation down
        typer.echo(f"emulated cluster: {cluster.describe()}")
        if calibrate is not None:
            _write_calibration(cluster, calibrate)
        try:
            if plan is not None:
                folder = out or plan.default_out()
                counts = run_study(
                    plan, folder, study_file=job, retry_failed=retry_failed, launch=cluster.execute
                )
                summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
                typer.echo(f"study {plan.section.name}: {summary}; store: {folder}")
                return
            run = runs[0]
            store = open_run_store(out or Path("runs"), run)
            with store.run_lock(run.run_id()):
                status = execute_run(run, store, workload=next(iter(built.values())), launch=cluster.execute)
        except ConfigError as exc:  # the store: in use, another study's, corrupt
            raise _fail(str(exc)) from None
    typer.echo(f"{status}: {store.run_dir(run.run_id())}")
    error = store.error(run.run_id())
    if error is not None:
        typer.secho(f"error: {error.line()}", fg=typer.colors.RED, err=True)
    if status != "completed":
        raise typer.Exit(code=1)


@cluster_app.command("calibrate")
def calibrate_command(
    out: Annotated[Path, typer.Option(help="The cluster file to write (TOML, read by report --cluster).")],
    nodes: NodesOption = 2,
    procs_per_node: ProcsOption = 2,
    rate: RateOption = None,
    burst: BurstOption = None,
) -> None:
    """Measure α and β of the emulated links (two nodes) and of a node's loopback with gloo
    all-reduces of a few sizes, and write the cluster file the cost model reads."""
    cluster = _emulated_cluster(nodes, procs_per_node, rate, burst)
    if nodes < 2:
        raise _fail("--nodes must be >= 2: the inter-node link is measured between two nodes")
    with cluster:
        _write_calibration(cluster, out)


@cluster_app.command()
def cleanup() -> None:
    """Delete what emulations killed without a chance to clean up (SIGKILL) left behind."""
    from localsgd.emulation import cleanup_stale, unavailable

    why = unavailable()
    if why is not None:
        raise _fail(why)
    removed = cleanup_stale()
    typer.echo(f"removed {len(removed)} namespace(s)" + (f": {', '.join(removed)}" if removed else ""))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
