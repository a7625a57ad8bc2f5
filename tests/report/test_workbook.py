"""results.xlsx: number formats by the rounding rule, percent cells, a units sheet, filters,
frozen panes, one column per counter, and only the config fields that apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from localsgd.records import Store
from localsgd.report import workbook
from localsgd.report.tables import load
from localsgd.run.config import OPTIMIZERS, SCHEDULES, RunConfig
from localsgd.util.nest import flatten
from report.records import write_run
from report.stores import build_estimate_store, config_of, rows_of, run_id_of

# One xdist worker runs this module, so conftest's session report is built once per session, not once per worker.
pytestmark = pytest.mark.xdist_group("report_build")

openpyxl = pytest.importorskip("openpyxl")
pd = pytest.importorskip("pandas")


def _columns(sheet: Any) -> dict[str, int]:
    return {cell.value: cell.column for cell in sheet[1]}


def _cell(sheet: Any, column: str, where: str, value: Any) -> Any:
    """The cell of ``column`` in the row whose ``where`` column holds ``value``."""
    columns = _columns(sheet)
    for row in sheet.iter_rows(min_row=2):
        if row[columns[where] - 1].value == value:
            return row[columns[column] - 1]
    raise AssertionError(f"no row with {where} = {value!r}")


def test_summary_cells_carry_the_report_rounding(report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = report
    summary = openpyxl.load_workbook(paths["xlsx"])["summary"]

    def fmt(column: str, variant: str) -> str:
        return str(_cell(summary, column, "variant", variant).number_format)

    # The stored numbers stay unrounded fractions; the report shows 90.5 ± 0.5 % and
    # 88.2 ± 1.3 %: percent cells with one decimal.
    accuracy = _cell(summary, "final_accuracy_mean", "variant", "minibatch_sgd")
    assert accuracy.value == pytest.approx((0.900 + 0.910 + 0.905) / 3)
    assert accuracy.number_format == "0.0%"
    assert fmt("final_accuracy_std", "minibatch_sgd") == "0.0%"
    assert fmt("final_accuracy_mean", "local_sgd H=4") == "0.0%"
    # 101.0 ± 2.6 s, speedup 1.83 ± 0.09, 1 for the baseline itself.
    assert fmt("wall_seconds_mean", "minibatch_sgd") == "0.0"
    assert fmt("speedup", "local_sgd H=4") == fmt("speedup_std", "local_sgd H=4") == "0.00"
    assert fmt("n_seeds", "local_sgd H=4") == "0"
    # One worker communicates nothing: no sync count.
    assert _cell(summary, "syncs_mean", "variant", "minibatch_sgd").value is None
    assert _cell(summary, "syncs_mean", "variant", "local_sgd H=4").value == 50


def test_every_sheet_has_a_filter_frozen_identity_and_its_units(report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = report
    book = openpyxl.load_workbook(paths["xlsx"])
    frozen = {"summary": "variant", "status": "variant", "baseline": "workload", "runs": "run_id"}
    for name, column in frozen.items():
        sheet = book[name]
        assert sheet.auto_filter.ref == sheet.dimensions, name
        assert sheet.freeze_panes == sheet.cell(2, _columns(sheet)[column] + 1).coordinate, name
    units = {(r[0], r[1]): (r[2], r[3]) for r in book["units"].iter_rows(min_row=2, values_only=True)}
    for name in book.sheetnames:
        if name == "units":
            continue
        for header in _columns(book[name]):
            meaning = units[(name, header)][1]
            assert meaning, f"{name}.{header} has no meaning in the units sheet"
    assert units[("summary", "final_accuracy_mean")][0] == "% (stored as a fraction)"
    assert units[("summary", "wall_seconds_std")] == (
        "s",
        "training wall time, evaluation excluded, std over seeds (ddof=1)",
    )
    assert units[("summary", "speedup")][0] == "×"
    assert not units[("metrics", "eval_loss")][0]  # a loss has no unit


def test_counters_per_scope_are_columns(tmp_path: Path) -> None:
    build_estimate_store(tmp_path)
    study = load(tmp_path)
    sheet = workbook.metrics_sheet(study.metrics, study.runs)
    assert "by_scope" not in sheet.columns
    assert {"world.collectives", "world.bytes", "world.seconds", "block2.bytes"} <= set(sheet.columns)
    hier = sheet[sheet["variant"] == "hierarchical_local_sgd H=2 Hb=4 G=2"].sort_values("step")
    last = hier.iloc[-1]
    assert last["world.collectives"] == 200 // 4 and last["block2.collectives"] == 200 // 2 - 200 // 4
    assert last["world.bytes"] + last["block2.bytes"] == last["bytes"]
    assert not any(isinstance(v, (dict, str)) and "{" in str(v) for v in sheet.to_numpy().ravel())


def test_only_the_config_fields_that_apply(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for name in ("sgd", "adamw"):
        config = config_of({"name": "minibatch_sgd"}, 1, 0)
        config["optimizer"]["name"] = name
        write_run(
            store,
            run_id_of(config),
            config,
            rows_of(config["algorithm"], 1, 0, "completed", 9.0, 0.5),
            "completed",
        )
    runs = workbook.runs_sheet(load(tmp_path).runs).set_index("config.optimizer.name")
    assert runs.loc["sgd", "config.optimizer.momentum"] == 0.9
    assert runs.loc["adamw", "config.optimizer.beta2"] == 0.999
    for key in ("beta1", "beta2", "eps"):
        assert pd.isna(runs.loc["sgd", f"config.optimizer.{key}"])
    for key in ("momentum", "nesterov"):
        assert pd.isna(runs.loc["adamw", f"config.optimizer.{key}"])
    # A constant schedule: no step-decay milestones or gamma in any row, so no column.
    assert not any(
        c.startswith(("config.schedule.milestones", "config.schedule.gamma")) for c in runs.columns
    )
    every = load(tmp_path).runs
    sgd_only = workbook.runs_sheet(every[every["config.optimizer.name"] == "sgd"])
    assert not any(c.startswith("config.optimizer.beta") for c in sgd_only.columns)


def test_applicability_rules_name_real_config_keys_and_values() -> None:
    keys = flatten(RunConfig().to_dict())
    choices = {
        "optimizer.name": set(OPTIMIZERS),
        "schedule.name": set(SCHEDULES),
        "schedule.linear_scaling": {True},
    }
    for key, (controller, values) in workbook.APPLIES_WHEN.items():
        assert key in keys and controller in keys, key
        assert set(values) <= choices[controller], key
