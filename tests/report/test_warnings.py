"""``localsgd report`` on a damaged store: the report is written from what can be read, and
every run or file left out is named in one warning line on stderr, with exit code 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from localsgd.cli import INCOMPLETE, app
from localsgd.records import Store
from localsgd.report.tables import load, status_table
from report.stores import RUNS, build_store, config_of, run_id_of

FAST = ["--format", "png", "--dpi", "50"]


def _ids() -> list[str]:
    """The ids of the completed runs of the synthetic store, in its order."""
    return [run_id_of(config_of(a, k, s)) for a, k, s, status, _, _ in RUNS if status == "completed"]


def _damage(root: Path) -> tuple[str, str, str]:
    """Corrupt one run's status.json, delete another's folder, cut a third's metrics.jsonl
    mid-line; their ids, in that order."""
    corrupt, gone, cut = _ids()[:3]
    store = Store(root, create=False)
    (store.run_dir(corrupt) / "status.json").write_text('{"version": 3, "status": "compl')
    shutil.rmtree(store.run_dir(gone))
    metrics = store.run_dir(cut) / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) - 40])  # the last row loses its end (and newline)
    return corrupt, gone, cut


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_a_damaged_store_is_reported_with_one_warning_per_problem_and_exit_3(tmp_path: Path) -> None:
    root = tmp_path / "store"
    build_store(root)
    corrupt, gone, cut = _damage(root)
    out = tmp_path / "report"

    result = CliRunner().invoke(app, ["report", str(root), "--out", str(out), *FAST])

    assert result.exit_code == INCOMPLETE == 3, result.output
    assert (
        (out / "report.md").is_file() and (out / "report.html").is_file() and (out / "results.xlsx").is_file()
    )
    warned = _warnings(result.stderr)
    assert len(warned) == 3, result.stderr
    runs = root / "runs"
    expected = {
        corrupt: f"warning: run {corrupt}: {runs / corrupt / 'status.json'}: is unreadable (",
        gone: f"warning: run {gone}: {runs / gone}: the run folder is missing",
        cut: f"warning: run {cut}: {runs / cut / 'metrics.jsonl'}: line 5 is cut off mid-line "
        "(dropped; 4 evaluation rows read)",
    }
    for run_id, start in expected.items():
        assert sum(line.startswith(start) for line in warned) == 1, (run_id, warned)
    assert not _warnings(result.stdout)  # warnings go where errors go, not into the listing


def test_the_loader_keeps_the_cut_runs_readable_rows_and_counts_the_others_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "store"
    build_store(root)
    corrupt, gone, cut = _damage(root)

    study = load(root)

    assert [(p.run_id, p.file.name) for p in study.problems] == [
        (corrupt, "status.json"),
        (gone, gone),
        (cut, "metrics.jsonl"),
    ]
    status = study.runs.set_index("run_id")["status"]
    assert status[corrupt] == status[gone] == "unreadable"
    assert status[cut] == "completed"
    assert sorted(study.metrics.loc[study.metrics["run_id"] == cut, "step"]) == [0, 50, 100, 150]
    assert status_table(study)["unreadable"].sum() == 2


def test_a_metrics_file_with_a_bad_line_before_the_last_makes_the_run_unreadable_with_a_warning(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    build_store(root)
    run_id = _ids()[0]
    metrics = Store(root, create=False).run_dir(run_id) / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:10]
    metrics.write_text("\n".join(lines) + "\n")

    (problem,) = load(root).problems

    assert problem.run_id == run_id and problem.file == metrics
    assert problem.what.startswith("line 2: not JSON (")
    assert json.loads(lines[2])["step"] == 100  # the rows after it are intact, yet not trusted


def test_an_intact_store_gives_no_warning_and_exit_0(tmp_path: Path) -> None:
    root = tmp_path / "store"
    build_store(root)

    result = CliRunner().invoke(app, ["report", str(root), "--out", str(tmp_path / "report"), *FAST])

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "markdown: " in result.stdout


def test_the_exit_code_of_an_incomplete_report_is_documented() -> None:
    from localsgd.cli import report

    assert "3 written but incomplete" in " ".join((report.__doc__ or "").split())
    table = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| command | 0 |"))
    row = next(line for line in table if line.startswith("| `localsgd report`"))
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|")))
    assert "incomplete" in cells[" 3 "], cells
