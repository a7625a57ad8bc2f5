"""``make_report``: a store in; tables, figures (PNG, PDF, SVG), report.md, report.html and
results.xlsx out.

The report is its sections (:data:`localsgd.report.sections.SECTIONS`, in order), each
returning its blocks, figures and sheets for one :class:`~localsgd.report.section.Context`
computed here. This module validates the options, computes the context, draws every
figure, writes the workbook and then the documents that refer to both."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localsgd.costmodel import Cluster, load_cluster
from localsgd.report import graphics, sections, steps, workbook
from localsgd.report.estimates import ClusterEstimates, estimate, parse_target
from localsgd.report.render import Block, to_html, to_markdown
from localsgd.report.section import Context, Drawing, Drawn, Parts, Section, resolve
from localsgd.report.sections.overview import TITLE
from localsgd.report.selection import check_split, selection
from localsgd.report.tables import Problem, baseline_table, curves, load, status_table, summary_table
from localsgd.util.files import write_atomic

log = logging.getLogger(__name__)

FORMATS = graphics.FORMATS
DPI = graphics.DPI


def check_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,pdf"`` or ``["png", "pdf"]`` -> ``("png", "pdf")``; ``ValueError`` naming
    ``--format`` and the allowed formats."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = tuple(dict.fromkeys(str(f).strip().lower() for f in items if str(f).strip()))
    wrong = [f for f in chosen if f not in FORMATS]
    if wrong or not chosen:
        raise ValueError(f"--format must be a comma-separated list of {', '.join(FORMATS)}, got {formats!r}")
    return chosen


def check_dpi(dpi: int) -> int:
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not 50 <= dpi <= 1200:
        raise ValueError(f"--dpi must be a whole number from 50 to 1200, got {dpi!r}")
    return dpi


class Written(dict[str, Path]):
    """The paths :func:`make_report` wrote, by kind, and the ``problems`` of the store that
    the report could not read (empty when the report is complete)."""

    def __init__(self, paths: dict[str, Path], problems: Sequence[Problem] = ()) -> None:
        super().__init__(paths)
        self.problems: tuple[Problem, ...] = tuple(problems)


def make_report(
    store_dir: str | Path,
    out_dir: str | Path | None = None,
    cluster: Cluster | str | Path | None = None,
    target: str | None = None,
    formats: str | Sequence[str] = FORMATS,
    dpi: int = DPI,
    select_on: str = "validation",
) -> Written:
    """Write the report of the store at ``store_dir`` into ``out_dir`` (default
    ``STORE/report``) and return the paths written: ``markdown``, ``html``, ``xlsx`` and
    ``<figure>.<format>`` for every figure drawn in every one of ``formats`` (PNG, PDF,
    SVG; PNG at ``dpi``), with ``problems``: one per run that could not be read (a missing
    folder, an unreadable status or metrics file) and per metrics stream cut off mid-line
    (see :class:`Written`); the report is written without what they name.

    With ``cluster`` (a :class:`~localsgd.costmodel.Cluster`, a preset name or a cluster
    TOML path), the report adds wall-clock estimates on that cluster: summary columns,
    time to ``target`` (``"METRIC=VALUE"`` or a value of the primary metric; default: the
    best mean final value of each workload's primary metric, 5 % short of it), and three
    figures. With ``target``, or a ``[study] target`` table in the study's plan, the report
    adds steps-to-result (:mod:`~localsgd.report.steps`): a table, its figures and a
    workbook sheet. Targets and steps-to-result read the split ``select_on`` names
    (``validation``, held out of the training data, or ``test``; a workload whose runs hold
    no validation split is selected on test, and the report says so); every other figure
    and table shows the test split. Reads only the store. Each file is written to a temporary name and renamed
    into place; the figures and the workbook come before the documents that refer to them.
    ``ValueError`` when ``store_dir`` is not a store or has no finished run, for an
    unknown cluster, a malformed target, format or dpi.
    """
    ctx = context(store_dir, out_dir, cluster, target, formats, dpi, select_on)
    made = [(section, section.parts(ctx)) for section in sections.SECTIONS]
    drawings = _drawings(made)
    sheets = _sheets(made)
    ctx.out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    images: dict[str, bytes] = {}
    drawn: dict[str, tuple[Drawing, graphics.Plot]] = {}
    for stem, drawing in drawings.items():
        plot = drawing.draw()
        drawn[stem] = (drawing, plot)
        if plot.figure is not None:
            _write_figure(ctx, stem, plot.figure, images, paths)
    paths["xlsx"] = workbook.write_workbook(ctx.out / "results.xlsx", sheets, ctx.study.metric_list())
    blocks = _document(made, drawn, ctx.formats)
    paths["markdown"] = write_atomic(ctx.out / "report.md", to_markdown(blocks))
    paths["html"] = write_atomic(ctx.out / "report.html", to_html(blocks, TITLE, images))
    log.info("report of %s written to %s", ctx.study.root, ctx.out)
    return Written(paths, ctx.study.problems)


def context(
    store_dir: str | Path,
    out_dir: str | Path | None = None,
    cluster: Cluster | str | Path | None = None,
    target: str | None = None,
    formats: str | Sequence[str] = FORMATS,
    dpi: int = DPI,
    select_on: str = "validation",
) -> Context:
    """What the sections read, from the store and :func:`make_report`'s options (checked
    first, before the store is read)."""
    chosen = check_formats(formats)
    dpi = check_dpi(dpi)
    goal = parse_target(target)
    check_split(select_on)
    resolved = cluster if isinstance(cluster, Cluster) or cluster is None else load_cluster(cluster)
    study = load(store_dir)
    select = selection(study, select_on)
    summary = summary_table(study)
    estimates: ClusterEstimates | None = None
    if resolved is not None:
        estimates = estimate(study, summary, resolved, goal, select)
        study, summary = estimates.study, estimates.summary
    goals = steps.goals(study, target)
    return Context(
        study=study,
        summary=summary,
        status=status_table(study),
        baseline=baseline_table(study),
        curves=curves(study),
        look=graphics.styles(summary),
        metrics={w: m for w in study.declared if (m := study.primary(w)) is not None},
        select=select,
        estimates=estimates,
        goals=goals,
        step_table=steps.steps_table(study, goals, select) if goals else None,
        formats=chosen,
        dpi=dpi,
        out=Path(out_dir) if out_dir is not None else study.root / "report",
    )


def _name(section: Section) -> str:
    return str(getattr(section, "__name__", section))


def _drawings(made: Sequence[tuple[Section, Parts]]) -> dict[str, Drawing]:
    """Every section's figures by stem, in order; a stem is one section's alone."""
    owners: dict[str, Section] = {}
    out: dict[str, Drawing] = {}
    for section, parts in made:
        for drawing in parts.figures:
            other = owners.setdefault(drawing.stem, section)
            assert drawing.stem not in out, (
                f"figure {drawing.stem!r} is drawn by both {_name(other)} and {_name(section)}"
            )
            out[drawing.stem] = drawing
    return out


def _sheets(made: Sequence[tuple[Section, Parts]]) -> dict[str, workbook.Sheet]:
    """Every section's workbook sheets, in order; a sheet name is one section's alone."""
    owners: dict[str, Section] = {}
    out: dict[str, workbook.Sheet] = {}
    for section, parts in made:
        for name, sheet in parts.sheets.items():
            other = owners.setdefault(name, section)
            assert name not in out, f"sheet {name!r} is written by both {_name(other)} and {_name(section)}"
            out[name] = sheet
    return out


def _document(made: Sequence[tuple[Section, Parts]], drawn: Drawn, formats: Sequence[str]) -> list[Block]:
    return resolve([block for _, parts in made for block in parts.blocks], drawn, formats)


def _write_figure(
    ctx: Context, stem: str, figure: Any, images: dict[str, bytes], paths: dict[str, Path]
) -> None:
    """``stem.<format>`` for each format, and the PNG for the HTML page (written or not)."""
    files = graphics.render(figure, ctx.formats, ctx.dpi)
    images[stem] = files["png"]
    for kind in ctx.formats:
        paths[f"{stem}.{kind}"] = write_atomic(ctx.out / f"{stem}.{kind}", files[kind])
