"""The H·K figure: one line per K across its periods, the synchronous baseline of each K."""

from __future__ import annotations

from pathlib import Path

from localsgd.records import Store
from localsgd.report import hk_plots
from localsgd.report.build import context
from localsgd.report.section import Parts
from localsgd.report.sections import hk
from localsgd.report.tables import load, summary_table
from localsgd.run.config import RunConfig
from localsgd.workloads import ACCURACY
from report.records import write_run

# (workers, algorithm, period) -> final accuracy of seeds 0 and 1
FINALS = {
    (4, "local_sgd", 1): (0.95, 0.97),
    (4, "local_sgd", 4): (0.93, 0.95),
    (16, "local_sgd", 1): (0.90, 0.92),
    (16, "local_sgd", 4): (0.80, 0.84),
    (4, "minibatch_sgd", None): (0.96, 0.96),
    (16, "minibatch_sgd", None): (0.91, 0.93),
    (16, "slowmo", 4): (0.85, 0.85),  # one period only: no line of its own
}


def _store(root: Path, finals: dict) -> Store:
    store = Store(root)
    for (workers, name, period), accs in finals.items():
        for seed, acc in enumerate(accs):
            config = RunConfig(name="hk", workers=workers, seed=seed).to_dict()
            config["algorithm"] = {"name": name, **({"period": period} if period else {})}
            rows = [{"step": 10, "epoch": 1.0, "samples": 160, "wall_seconds": 1.0, "test_accuracy": acc, "test_loss": 0.1}]
            write_run(store, f"{name}-{workers}-{period}-{seed}", config, rows, "completed")
    return store


def test_one_line_per_k_with_its_baseline(tmp_path: Path) -> None:
    study = load(_store(tmp_path / "store", FINALS).root)
    summary = summary_table(study)
    figure = hk_plots.metric_vs_hk(summary, {"mnist1d_cnn": ACCURACY})
    assert figure is not None
    (ax,) = [a for a in figure.axes if a.get_visible()]
    assert ax.get_title() == "local_sgd"
    lines = sorted(
        (tuple(float(x) for x in line.get_xdata()), tuple(round(float(y), 6) for y in line.get_ydata()))
        for line in ax.get_lines()
        if len(line.get_xdata()) == 2 and line.get_linestyle() != "None"
    )
    # Local SGD at K = 4 (H·K = 4, 16: means 96 and 94) and K = 16 (16, 64: 91 and 82), and
    # each K's mini-batch SGD dashed across that K's points at its mean (96 and 92).
    assert lines == [
        ((4.0, 16.0), (96.0, 94.0)),
        ((4.0, 16.0), (96.0, 96.0)),
        ((16.0, 64.0), (91.0, 82.0)),
        ((16.0, 64.0), (92.0, 92.0)),
    ]
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == [
        "K=4, H = 1, 4 (n=2)",
        "minibatch_sgd, K=4 (n=2)",
        "K=16, H = 1, 4 (n=2)",
        "minibatch_sgd, K=16 (n=2)",
    ]


def test_no_figure_without_a_sweep_of_h(tmp_path: Path) -> None:
    single = {k: v for k, v in FINALS.items() if k[2] != 4 or k[1] == "slowmo"}
    study = load(_store(tmp_path / "store", single).root)
    summary = summary_table(study)
    assert not hk_plots.has_sweep(summary)
    # ... and then the section, with its heading, is left out.
    assert hk.parts(context(tmp_path / "store")) == Parts()
