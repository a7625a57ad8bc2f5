"""The report: a hand-built store of synthetic runs in, tables checked against the raw rows."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from localsgd.records import Store
from localsgd.report import make_report, variant_label
from report.records import write_run
from report.stores import FAILURE, RUNS, STEPS, build_estimate_store, config_of, rows_of, run_id_of

# One xdist worker runs this module, so conftest's session report is built once per session, not once per worker.
pytestmark = pytest.mark.xdist_group("report_build")

pd = pytest.importorskip("pandas")
openpyxl = pytest.importorskip("openpyxl")

PLOTS = (
    "pareto_speedup",
    "metric_vs_speedup",
    "metric_vs_epochs",
    "metric_vs_wall_time",
    "train_loss_vs_epochs",
    "train_loss_vs_wall_time",
    "metric_vs_bytes",
    "metric_vs_period_workers",
)
FORMATS = ("png", "pdf", "svg")


def is_format(data: bytes, kind: str) -> bool:
    """Whether ``data`` starts as a file of ``kind`` does."""
    if kind == "png":
        return data[:8] == b"\x89PNG\r\n\x1a\n"
    if kind == "pdf":
        return data[:5] == b"%PDF-" and data.rstrip().endswith(b"%%EOF")
    head = data[:400].decode("utf-8", "replace")
    return head.startswith("<?xml") and "<svg" in head and data.rstrip().endswith(b"</svg>")


def _raw_final(store_root: Path) -> dict[str, list[dict[str, Any]]]:
    """Completed runs' last metric rows by variant label, straight from the JSONL files."""
    out: dict[str, list[dict[str, Any]]] = {}
    for run in sorted((store_root / "runs").iterdir()):
        status = json.loads((run / "status.json").read_text())["status"]
        if status != "completed":
            continue
        config = json.loads((run / "config.json").read_text())["config"]
        lines = (run / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1])
        out.setdefault(f"{variant_label(config)} K={config['workers']}", []).append(last)
    return out


def _sheet(paths: dict[str, Path], name: str) -> Any:
    return pd.read_excel(paths["xlsx"], sheet_name=name)


def test_every_file_is_written_in_every_format(report: tuple[Path, dict[str, Path]]) -> None:
    root, paths = report
    out = root / "report"
    assert set(paths) == {"markdown", "html", "xlsx", *(f"{s}.{f}" for s in PLOTS for f in FORMATS)}
    for kind, path in paths.items():
        assert path.parent == out, (kind, path)
        assert path.is_file() and path.stat().st_size > 0, kind
    for stem in PLOTS:
        for kind in FORMATS:
            assert is_format(paths[f"{stem}.{kind}"].read_bytes(), kind), (stem, kind)
    # PDF fonts embedded as TrueType (Type 42), not Type 3, which publishers refuse.
    pdf = paths["metric_vs_speedup.pdf"].read_bytes()
    assert b"/CIDFontType2" in pdf and b"/Type3" not in pdf
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_formats_and_dpi_are_chosen_and_checked(report: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    root, default = report
    paths = make_report(root, tmp_path / "svg", formats="svg", dpi=60)
    figures = {k for k in paths if k not in ("markdown", "html", "xlsx")}
    assert figures == {f"{s}.svg" for s in PLOTS}
    text = paths["markdown"].read_text()
    assert "](metric_vs_speedup.svg)" in text and ".png" not in text
    # The HTML page embeds PNGs whatever is written, at the chosen dpi: 60 against 200.
    from PIL import Image

    html = paths["html"].read_text()
    embedded = re.findall(r'id="fig-([a-z_]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html)
    assert [stem for stem, _ in embedded] == list(PLOTS)
    for stem, data in embedded:
        small = Image.open(io.BytesIO(base64.b64decode(data))).size
        large = Image.open(default[f"{stem}.png"]).size
        assert large[0] == pytest.approx(small[0] * 200 / 60, rel=0.02), stem
        assert large[1] == pytest.approx(small[1] * 200 / 60, rel=0.02), stem
    for bad in ("png,gif", ""):
        with pytest.raises(ValueError, match="--format must be a comma-separated list of png, pdf, svg"):
            make_report(root, tmp_path / "bad", formats=bad)
    with pytest.raises(ValueError, match="--dpi must be a whole number from 50 to 1200"):
        make_report(root, tmp_path / "bad", dpi=10)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_markdown_links_every_figure_and_names_the_baseline(report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = report
    text = paths["markdown"].read_text()
    for stem in PLOTS:
        assert f"]({stem}.png)" in text
        assert f"[PDF]({stem}.pdf)" in text and f"[SVG]({stem}.svg)" in text
    assert "[results.xlsx](results.xlsx)" in text
    assert "- [Summary](#summary)" in text  # the table of contents
    assert "mnist1d_cnn" in text
    assert "the 3 completed K=1 run(s) (minibatch_sgd; seeds 0, 1, 2)" in text
    assert "10 finished runs: 8 completed, 1 failed, 1 diverged" in text
    assert "| local_sgd H=4 | 2 |" in text


def _row(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_cells_follow_one_rounding_rule(report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = report
    text = paths["markdown"].read_text()
    header = _row(text, "| variant |")
    base = dict(zip(header, _row(text, "| minibatch_sgd | 1 |")))
    local = dict(zip(header, _row(text, "| local_sgd H=4 | 2 |")))
    # Accuracy 0.900, 0.910, 0.905: 90.5 ± 0.5 %; local SGD 0.880, 0.895, 0.870: 88.2 ± 1.3 %.
    assert base["final test accuracy (%)"] == "90.5 ± 0.5"
    assert local["final test accuracy (%)"] == "88.2 ± 1.3"
    # Wall times 100, 104, 99 s and 55, 57.5, 53 s.
    assert base["wall time (s)"] == "101.0 ± 2.6"
    assert local["wall time (s)"] == "55.2 ± 2.3"
    # Speedup 101 / 55.17 = 1.831 ± 1.831·sqrt((2.646/101)² + (2.255/55.17)²) = 0.089.
    assert local["speedup (×)"] == "1.83 ± 0.09"
    assert base["speedup (×)"] == "1 (baseline)"
    # One worker communicates nothing: no payload, no syncs (it counted 200 steps).
    assert base["payload per worker"] == base["syncs"] == "—"
    assert local["payload per worker"] == "200 kB" and local["syncs"] == "50"


def test_html_has_contents_links_and_embedded_figures(report: tuple[Path, dict[str, Path]]) -> None:
    root, paths = report
    text = paths["html"].read_text()
    assert text.count("data:image/png;base64,") == len(PLOTS)
    sources = re.findall(r"""src\s*=\s*["']?([^"'\s>]+)""", text, flags=re.IGNORECASE)
    assert sources and all(s.startswith("data:") for s in sources), sources
    links = re.findall(r"""href\s*=\s*["']([^"']+)["']""", text, flags=re.IGNORECASE)
    anchors = set(re.findall(r'id="([^"]+)"', text))
    files = {p.name for p in (root / "report").iterdir()}
    for link in links:
        assert (link[1:] in anchors) if link.startswith("#") else (link in files), link
    for stem in PLOTS:
        for kind in FORMATS:
            assert f'href="{stem}.{kind}"' in text
        assert f'href="#fig-{stem}"' in text
    assert 'href="results.xlsx"' in text and '<nav class="toc">' in text
    assert "<link" not in text and "<script" not in text and "@import" not in text
    assert "<table>" in text and "slowmo H=8 μ=0.5 η=1" in text


def test_workbook_sheets(report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = report
    book = openpyxl.load_workbook(paths["xlsx"], read_only=True)
    assert book.sheetnames == ["summary", "status", "baseline", "runs", "metrics", "units"]
    runs = _sheet(paths, "runs")
    assert len(runs) == len(RUNS)
    assert {"run_id", "status", "config.workers", "config.algorithm.name", "final_accuracy"} <= set(
        runs.columns
    )
    metrics = _sheet(paths, "metrics")
    assert len(metrics) == len(STEPS) * sum(1 for r in RUNS if r[3] != "failed")
    assert set(metrics["run_id"]) <= set(runs["run_id"])


def test_summary_matches_the_raw_rows(report: tuple[Path, dict[str, Path]]) -> None:
    root, paths = report
    raw = _raw_final(root)
    summary = _sheet(paths, "summary")
    base_walls = [r["wall_seconds"] for r in raw["minibatch_sgd K=1"]]
    base_wall, base_sd = statistics.mean(base_walls), statistics.stdev(base_walls)
    assert len(summary) == len(raw) == 3
    for row in summary.itertuples(index=False):
        finals = raw[f"{row.variant} K={row.workers}"]
        accs = [r["metrics"]["accuracy"] for r in finals]
        walls = [r["wall_seconds"] for r in finals]
        assert row.n_seeds == len(finals)
        assert row.final_accuracy_mean == pytest.approx(statistics.mean(accs), abs=1e-9)
        assert row.final_accuracy_std == pytest.approx(statistics.stdev(accs), abs=1e-9)
        assert row.wall_seconds_mean == pytest.approx(statistics.mean(walls), abs=1e-9)
        assert row.speedup == pytest.approx(base_wall / statistics.mean(walls), abs=1e-9)
        if row.workers > 1:  # the spread of both wall times, propagated to first order
            wall, sd = statistics.mean(walls), statistics.stdev(walls)
            expected = (base_wall / wall) * math.sqrt((base_sd / base_wall) ** 2 + (sd / wall) ** 2)
            assert row.speedup_std == pytest.approx(expected, rel=1e-9)
        else:  # the baseline itself: 1 by definition
            assert row.speedup == 1.0 and row.speedup_std == 0.0
        assert row.bytes_mean == pytest.approx(statistics.mean(r["bytes"] for r in finals), abs=1e-9)
    by_variant = summary.set_index("variant")
    assert by_variant.loc["minibatch_sgd", "speedup"] == pytest.approx(1.0, abs=1e-12)
    # The diverged seed 3 (final accuracy 0.1) and the failed seed 2 are not in the means.
    assert by_variant.loc["local_sgd H=4", "n_seeds"] == 3
    assert by_variant.loc["local_sgd H=4", "seeds"] == "0, 1, 2"
    assert by_variant.loc["slowmo H=8 μ=0.5 η=1", "n_seeds"] == 2


def test_status_table_counts_failed_and_diverged(report: tuple[Path, dict[str, Path]]) -> None:
    _, paths = report
    status = _sheet(paths, "status").set_index("variant")
    assert status.loc["minibatch_sgd", ["completed", "failed", "diverged"]].tolist() == [3, 0, 0]
    assert status.loc["local_sgd H=4", ["completed", "failed", "diverged"]].tolist() == [3, 0, 1]
    assert status.loc["slowmo H=8 μ=0.5 η=1", ["completed", "failed", "diverged"]].tolist() == [2, 1, 0]
    assert "RuntimeError: worker 1 lost" in status.loc["slowmo H=8 μ=0.5 η=1", "errors"]
    assert "train loss is inf" in status.loc["local_sgd H=4", "errors"]
    text = paths["markdown"].read_text()
    assert "seed 2 (failed): RuntimeError: worker 1 lost" in text


def test_one_seed_has_blank_std_and_out_dir_is_honoured(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    config = config_of({"name": "local_sgd", "period": 2}, 1, 0)
    rows = rows_of(config["algorithm"], 1, 0, "completed", 10.0, 0.5)
    write_run(store, "only", config, rows, "completed")
    paths = make_report(tmp_path / "store", tmp_path / "elsewhere", formats="png")
    assert paths["html"] == tmp_path / "elsewhere" / "report.html"
    summary = _sheet(paths, "summary")
    assert summary.loc[0, "n_seeds"] == 1
    assert math.isnan(summary.loc[0, "final_accuracy_std"])
    assert summary.loc[0, "final_accuracy_mean"] == pytest.approx(0.5, abs=1e-12)
    assert summary.loc[0, "speedup"] == pytest.approx(1.0)


def test_empty_store_and_non_store_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a localsgd store"):
        make_report(tmp_path / "nothing")
    store = Store(tmp_path / "empty")
    with pytest.raises(ValueError, match="no finished runs"):
        make_report(tmp_path / "empty")
    store.begin("running", "running", config_of({"name": "minibatch_sgd"}, 1, 0))
    with pytest.raises(ValueError, match="no finished runs"):
        make_report(tmp_path / "empty")


@pytest.mark.parametrize(
    ("algorithm", "label"),
    [
        ({"name": "minibatch_sgd"}, "minibatch_sgd"),
        ({"name": "local_sgd", "period": 4}, "local_sgd H=4"),
        ({"name": "local_sgd"}, "local_sgd H=8"),
        ({"name": "post_local_sgd", "switch_step": 200, "period": 16}, "post_local_sgd t'=200 H=16"),
        ({"name": "post_local_sgd", "switch_epoch": 2.5}, "post_local_sgd t'=2.5ep H=8"),
        (
            {"name": "hierarchical_local_sgd", "period": 2, "block_period": 4, "block_size": 2},
            "hierarchical_local_sgd H=2 Hb=4 G=2",
        ),
        ({"name": "slowmo", "period": 8, "outer_momentum": 0.5, "outer_lr": 1.0}, "slowmo H=8 μ=0.5 η=1"),
        ({"name": "diloco", "period": 8}, "diloco H=8 η=0.7 μ=0.9"),
        ({"name": "sma"}, "sma λ=1/K μ=0.9"),
        ({"name": "sma", "alpha": 0.25}, "sma λ=0.25 μ=0.9"),
        ({"name": "gradient_accumulation", "steps": 4}, "gradient_accumulation k=4"),
        (
            {"name": "local_sgd", "period": 4, "optimizer_state": "average"},
            "local_sgd H=4 optimizer_state=average",
        ),
    ],
)
def test_variant_label(algorithm: dict[str, Any], label: str) -> None:
    assert variant_label({"algorithm": algorithm}) == label


def _add_run(store: Store, config: dict[str, Any], status: str, wall: float, acc: float) -> None:
    run_id = run_id_of(config)
    rows = rows_of(config["algorithm"], config["workers"], config["seed"], status, wall, acc)
    write_run(store, run_id, config, rows, status, FAILURE)


def test_only_failed_runs_still_report(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for seed in (0, 1):
        _add_run(store, config_of({"name": "local_sgd"}, 2, seed), "failed", 0.0, 0.0)
    paths = make_report(tmp_path)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert _sheet(paths, "summary").empty
    status = _sheet(paths, "status")
    assert status.loc[0, ["completed", "failed", "diverged"]].tolist() == [0, 2, 0]
    assert "no completed run" in paths["markdown"].read_text()


def test_other_varying_keys_split_groups_and_workloads_have_their_own_baseline(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for epochs, wall in ((2.0, 50.0), (4.0, 100.0)):
        for seed in (0, 1):
            config = config_of({"name": "local_sgd", "period": 4}, 2, seed)
            config["train"]["epochs"] = epochs
            config["name"] = f"e{epochs}-s{seed}"
            _add_run(store, config, "completed", wall + seed, 0.8 + 0.01 * seed)
    baseline = config_of({"name": "minibatch_sgd"}, 1, 0)
    baseline["train"]["epochs"] = 4.0
    _add_run(store, baseline, "completed", 150.0, 0.85)
    other = config_of({"name": "minibatch_sgd"}, 2, 0)
    other["workload"] = {"name": "mnist1d_mlp"}
    _add_run(store, other, "completed", 10.0, 0.7)
    paths = make_report(tmp_path, formats="png")
    summary = _sheet(paths, "summary")
    assert "setting" in summary.columns
    cnn = summary[(summary["workload"] == "mnist1d_cnn") & (summary["workers"] == 2)].set_index("setting")
    assert cnn.loc["train.epochs=2.0", "n_seeds"] == 2
    assert cnn.loc["train.epochs=4.0", "n_seeds"] == 2
    # The baseline is the K=1 run with the same other settings: the 4-epoch one.
    assert cnn.loc["train.epochs=4.0", "speedup"] == pytest.approx(150.0 / 100.5, abs=1e-9)
    assert math.isnan(cnn.loc["train.epochs=2.0", "speedup"])
    mlp = summary[summary["workload"] == "mnist1d_mlp"]
    assert len(mlp) == 1 and math.isnan(mlp["speedup"].iloc[0])  # no K=1 run of that workload
    text = paths["markdown"].read_text()
    assert "Speedup baseline for mnist1d_cnn [train.epochs=2.0]: none" in text
    assert "Speedup baseline for mnist1d_cnn [train.epochs=4.0]: the 1 completed K=1 run(s)" in text


# -- estimates on a cluster ------------------------------------------------------------

EST_PLOTS = ("pareto_est_time", "metric_vs_est_speedup", "metric_vs_est_time")
LAB_TOML = """
name = "lab"
devices_per_node = 2
seconds_per_sample = 1.0e-4

[intra]
alpha = 2.0e-6
bandwidth_gbit = 400

[inter]
alpha = 5.0e-5
bandwidth_gbit = 10
"""


def _expected_estimates(root: Path, cluster: Any, target: float | None) -> dict[str, dict[str, float]]:
    """Per group label (variant K=k): the estimate columns, recomputed from the raw files
    with the per-collective formula of the cost model."""
    from localsgd.costmodel import collective_seconds

    def comm(counters: dict[str, dict[str, float]], workers: int) -> float:
        total = 0.0
        for scope, c in counters.items():
            if c["collectives"]:
                size = c["bytes"] / c["collectives"]  # equal-size collectives
                total += c["collectives"] * collective_seconds(size, scope, workers, cluster)
        return total

    def counters_of(row: dict[str, Any]) -> dict[str, dict[str, float]]:
        if row.get("by_scope"):
            return row["by_scope"]
        return {"world": {"collectives": row["collectives"], "bytes": row["bytes"]}}

    runs: dict[str, list[dict[str, Any]]] = {}
    for run in sorted((root / "runs").iterdir()):
        config = json.loads((run / "config.json").read_text())["config"]
        status = json.loads((run / "status.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        workers, batch, last = config["workers"], config["data"]["batch_size"], rows[-1]
        per_step = (
            batch * cluster.seconds_per_sample
            if cluster.seconds_per_sample is not None
            else (last["wall_seconds"] - last["comm_seconds"]) / last["step"]
        )
        final = status["counters"]["by_scope"] if status["counters"] else counters_of(last)
        timeline = [
            (r["step"], r["metrics"]["accuracy"], r["step"] * per_step, comm(counters_of(r), workers))
            for r in rows
        ]
        runs.setdefault(f"{variant_label(config)} K={workers}", []).append(
            {
                "compute": status["steps"] * per_step,
                "comm": comm(final, workers),
                "final_acc": last["metrics"]["accuracy"],
                "timeline": timeline,
            }
        )
    finals = {g: statistics.mean(r["final_acc"] for r in rs) for g, rs in runs.items()}
    target = target if target is not None else 0.95 * max(finals.values())
    out: dict[str, dict[str, float]] = {}
    base = statistics.mean(r["compute"] + r["comm"] for r in runs["minibatch_sgd K=1"])
    for group, rs in runs.items():
        totals = [r["compute"] + r["comm"] for r in rs]
        hits = []
        for r in rs:
            reached = [t for t in r["timeline"] if t[1] >= target]
            hits.append(reached[0] if reached else None)
        every = all(h is not None for h in hits)
        out[group] = {
            "est_compute_seconds_mean": statistics.mean(r["compute"] for r in rs),
            "est_comm_seconds_mean": statistics.mean(r["comm"] for r in rs),
            "est_total_seconds_mean": statistics.mean(totals),
            "est_total_seconds_std": statistics.stdev(totals) if len(totals) > 1 else math.nan,
            "est_speedup": base / statistics.mean(totals),
            "target_value": target,
            "est_target_reached": sum(h is not None for h in hits),
            "est_target_compute_seconds_mean": statistics.mean(h[2] for h in hits) if every else math.nan,  # type: ignore[index]
            "est_target_comm_seconds_mean": statistics.mean(h[3] for h in hits) if every else math.nan,  # type: ignore[index]
            "est_target_total_seconds_mean": statistics.mean(h[2] + h[3] for h in hits)
            if every
            else math.nan,  # type: ignore[index]
        }
    return out


@pytest.fixture(scope="module")
def estimate_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("estimates")
    build_estimate_store(root)
    return root


@pytest.mark.parametrize("which", ["preset", "toml"])
def test_cluster_estimates_match_the_raw_rows_and_the_model(
    estimate_store: Path, tmp_path: Path, which: str
) -> None:
    from localsgd.costmodel import load_cluster

    if which == "preset":
        spec, target = "10gbe", None  # measured compute, default target
    else:
        (tmp_path / "lab.toml").write_text(LAB_TOML)  # G = 2: K = 4 is 2 nodes × 2
        spec, target = str(tmp_path / "lab.toml"), 0.6
    cluster = load_cluster(spec)
    given = None if target is None else f"accuracy={target}"
    paths = make_report(estimate_store, tmp_path / "out", cluster=spec, target=given, formats="png")
    expected = _expected_estimates(estimate_store, cluster, target)
    summary = _sheet(paths, "summary")
    assert len(summary) == len(expected) == 4
    for row in summary.to_dict("records"):
        want = expected[f"{row['variant']} K={row['workers']}"]
        for column, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(row[column]), (row["variant"], column, row[column])
            else:
                assert row[column] == pytest.approx(value, rel=1e-9, abs=1e-12), (row["variant"], column)
    by_variant = summary.set_index("variant")
    assert by_variant.loc["minibatch_sgd", "est_speedup"] == pytest.approx(1.0)
    assert by_variant.loc["minibatch_sgd", "est_comm_seconds_mean"] == 0.0
    # Hierarchical costs less communication than local SGD with the same number of syncs.
    hier = "hierarchical_local_sgd H=2 Hb=4 G=2"
    assert (
        by_variant.loc[hier, "est_comm_seconds_mean"]
        < by_variant.loc["local_sgd H=2", "est_comm_seconds_mean"]
    )

    for stem in EST_PLOTS:
        assert is_format(paths[f"{stem}.png"].read_bytes(), "png")
    text = paths["markdown"].read_text()
    for stem in (*PLOTS, *EST_PLOTS):
        assert f"]({stem}.png)" in text
    assert f"## Estimated on cluster {cluster.name}" in text
    target_used = expected["minibatch_sgd K=1"]["target_value"]
    assert f"Target for mnist1d_cnn: test accuracy ≥ {100 * target_used:.4g}%" in text
    assert ("given (--target)" in text) == (target is not None)
    assert "| est. compute s | est. comm s | est. total s | est. speedup (×) |" in text
    html = paths["html"].read_text()
    # The runs are of worker processes: their measured times beside the estimates, one plot more.
    # With a target, steps-to-result too: its table, sheet and figures (no search: the
    # seeds are the trials).
    steps_figures = [
        "steps_to_result",
        "steps_to_result_normalised",
        "best_metaparameters",
        "local_sgd_steps_to_result",
    ]
    # Local SGD at two periods: the H·K section's figure, one line per K, one more.
    assert "## H·K" in text
    assert html.count("data:image/png;base64,") == len(PLOTS) + len(EST_PLOTS) + 1 + 1 + (
        len(steps_figures) if target is not None else 0
    )
    assert ("## Steps to result" in text) == (target is not None)
    if target is not None:
        assert all(f"]({stem}.png)" in text for stem in steps_figures)
        assert "steps_to_result" in openpyxl.load_workbook(paths["xlsx"], read_only=True).sheetnames
    assert f"## Measured against estimated on {cluster.name}" in text
    assert "cluster" in openpyxl.load_workbook(paths["xlsx"], read_only=True).sheetnames
    metrics = _sheet(paths, "metrics")
    assert {"est_compute_seconds", "est_comm_seconds", "est_total_seconds"} <= set(metrics.columns)


def test_cluster_errors(estimate_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown cluster 'fast': not a preset .*10gbe, 25gbe, 100g-ib"):
        make_report(estimate_store, tmp_path, cluster="fast")
    with pytest.raises(ValueError, match=r"--target must be METRIC=VALUE or a number for the primary metric"):
        make_report(estimate_store, tmp_path, cluster="wan", target="accuracy=high")
    with pytest.raises(
        ValueError, match=r"--target f1=0\.9: time to target uses the primary metric of mnist1d_cnn"
    ):
        make_report(estimate_store, tmp_path, cluster="wan", target="f1=0.9")
    with pytest.raises(
        ValueError, match=r"--target = 'f1=0\.9': mnist1d_cnn has the metrics \['accuracy', 'eval_loss'\]"
    ):
        make_report(estimate_store, tmp_path, target="f1=0.9")

    from typer.testing import CliRunner

    from localsgd.cli import app

    result = CliRunner().invoke(app, ["report", str(estimate_store), "--cluster", "fast"])
    assert result.exit_code == 2
    assert "unknown cluster 'fast'" in result.output and "nvlink-node" in result.output
    for option in (["--format", "png,gif"], ["--dpi", "20"]):
        result = CliRunner().invoke(
            app, ["report", str(estimate_store), "--out", str(tmp_path / "x"), *option]
        )
        assert result.exit_code == 2 and option[0] in result.output
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_formats_asked_for(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from localsgd.cli import app

    store = Store(tmp_path / "store")
    config = config_of({"name": "minibatch_sgd"}, 1, 0)
    write_run(store, "one", config, rows_of(config["algorithm"], 1, 0, "completed", 10.0, 0.5), "completed")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["report", str(tmp_path / "store"), "--out", str(out), "--format", "pdf"]
    )
    assert result.exit_code == 0, result.output
    written = {p.suffix for p in out.iterdir() if p.stem not in ("report", "results")}
    assert written == {".pdf"}
    assert f"figures: {len(list(out.glob('*.pdf')))} files (PDF) in {out}" in result.output
    assert f"html: {out / 'report.html'}" in result.output


def test_measured_compute_per_step() -> None:
    from localsgd.report.estimates import measured_compute_per_step

    assert measured_compute_per_step(10.0, 2.0, 100, 4) == pytest.approx(0.08)
    # An engine that ran all 4 replicas in one process: one worker's share.
    assert measured_compute_per_step(10.0, 2.0, 100, 4, real_wall_time=False) == pytest.approx(0.02)
    assert measured_compute_per_step(10.0, math.nan, 100, 1) == pytest.approx(0.1)  # K=1: no comm
    assert math.isnan(measured_compute_per_step(10.0, math.nan, 100, 4))
    assert math.isnan(measured_compute_per_step(10.0, 0.0, 0, 1))
