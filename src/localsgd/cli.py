"""The ``localsgd`` command: train one run, run a study, report on a store."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from localsgd.costmodel import presets as cluster_presets

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Communication-efficient data-parallel training: run, sweep and report local SGD and its family.",
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set algorithm.period=16 (repeatable)."),
]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config (TOML).")],
    out: Annotated[Path, typer.Option(help="Store to record the run in.")] = Path("runs"),
    overrides: SetOption = None,
) -> None:
    """Train one run and write its record (config, environment, metrics, checkpoint, status).

    Starts `workers` processes through torch's elastic launcher, unless already running
    under torchrun (then this process is one of the workers, and rank 0 records the run).
    """
    from localsgd.studies.loading import load_run_config
    from localsgd.util.checks import ConfigError

    try:
        run = load_run_config(config, overrides or [])
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if _inside_torchrun():
        from localsgd import worker

        argv = [str(config), "--out", str(out)]
        for item in overrides or []:
            argv += ["--set", item]
        raise typer.Exit(code=worker.main(argv))
    from localsgd.records import Store
    from localsgd.studies.runner import execute_run, preflight

    try:
        workload = next(iter(preflight([run]).values()))
        store = Store(out)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    status = execute_run(run, store, workload=workload)
    typer.echo(f"{status}: {store.run_dir(run.run_id())}")
    error = store.error(run.run_id())
    if error is not None:
        typer.secho(f"error: {error.line()}", fg=typer.colors.RED, err=True)
    if status != "completed":
        raise typer.Exit(code=1)


@app.command()
def study(
    config: Annotated[Path, typer.Argument(help="Study file (TOML): [study], [base] and [[grid]] blocks.")],
    out: Annotated[
        Path | None, typer.Option(help="Store folder (default: [study].out or studies_out/<name>).")
    ] = None,
    overrides: SetOption = None,
    retry_failed: Annotated[bool, typer.Option(help="Run failed and diverged runs again.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List the planned runs and stop.")] = False,
) -> None:
    """Run every run of a study's grid; rerunning skips finished runs and restarts unfinished ones."""
    from localsgd.studies.grid import load_study
    from localsgd.studies.runner import run_study
    from localsgd.util.checks import ConfigError

    try:
        plan = load_study(config, overrides or [])
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    folder = out or plan.default_out()
    if dry_run:
        for run in plan.runs:
            typer.echo(
                f"{run.run_id()}  K={run.workers}  B={run.data.batch_size}  seed={run.seed}  {run.algorithm}"
            )
        typer.echo(f"{len(plan.runs)} runs -> {folder}")
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        counts = run_study(plan, folder, study_file=config, retry_failed=retry_failed)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    typer.echo(f"study {plan.section.name}: {summary}; store: {folder}")


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
            help="With --cluster: the value of the primary metric to estimate the time to, as "
            "METRIC=VALUE (accuracy=0.9: accuracies are fractions) or a bare VALUE (default: the "
            "best mean final value of each workload, 5% short of it)."
        ),
    ] = None,
    formats: Annotated[
        str,
        typer.Option("--format", help="Figure files to write, comma-separated: png, pdf, svg."),
    ] = "png,pdf,svg",
    dpi: Annotated[int, typer.Option(help="Resolution of the PNG figures (dots per inch, 50 to 1200).")] = 200,
) -> None:
    """Tables (mean ± std over seeds), figures, report.md, report.html and results.xlsx from the store alone."""
    from localsgd.report import make_report

    try:
        paths = make_report(store_dir, out, cluster=cluster, target=target, formats=formats, dpi=dpi)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    figures = [p for kind, p in paths.items() if kind not in ("markdown", "html", "xlsx")]
    kinds = sorted({p.suffix.lstrip(".").upper() for p in figures})
    typer.echo(f"figures: {len(figures)} files ({', '.join(kinds)}) in {paths['html'].parent}")
    for kind in ("xlsx", "markdown", "html"):
        typer.echo(f"{kind}: {paths[kind]}")


@app.command()
def algorithms() -> None:
    """List the registered algorithms and their hyperparameters."""
    import dataclasses

    from localsgd import algorithms as registry

    for name in registry.names():
        cls = registry.get(name)
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        typer.echo(f"{name}: {cls.__name__}({fields})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
