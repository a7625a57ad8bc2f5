"""Steps-to-result: the first strict crossing, the minimum over trials, regimes, figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from localsgd.records import Store
from localsgd.report.steps import goals, regimes, steps_table
from localsgd.report.tables import load
from localsgd.run.config import RunConfig
from report.records import write_run

TARGET = 0.8


def _rows(crossing: list[float], syncs_per_step: float = 0.0) -> list[dict[str, Any]]:
    """Evaluations every 10 steps with these accuracies."""
    return [
        {
            "step": 10 * (i + 1),
            "epoch": 0.1 * (i + 1),
            "samples": 160 * (i + 1),
            "wall_seconds": 1.0 + i,
            "test_accuracy": acc,
            "test_loss": 1.0 - acc,
            "syncs": int(syncs_per_step * 10 * (i + 1)),
        }
        for i, acc in enumerate(crossing)
    ]


# (workers, batch, period, lr, momentum, accuracies every 10 steps, searched keys)
# Momentum searched: 160, 40, 10 steps at B = 16, 64, 256 (slope -1 twice); plain SGD:
# 160, 80, 80 (slope -0.5, then 0). An accuracy equal to the target is not a crossing.
RUNS: list[tuple[int, int, int | None, float, float, list[float], list[str]]] = [
    (1, 16, None, 0.1, 0.9, [0.5] * 15 + [0.81], ["optimizer.lr", "optimizer.momentum"]),
    (1, 16, None, 0.3, 0.5, [0.5] * 10 + [0.8] * 10, ["optimizer.lr", "optimizer.momentum"]),
    (1, 64, None, 0.2, 0.8, [0.5, 0.6, 0.7, 0.85], ["optimizer.lr", "optimizer.momentum"]),
    (1, 64, None, 0.4, 0.95, [0.5] * 4 + [0.9], ["optimizer.lr", "optimizer.momentum"]),
    (1, 256, None, 0.8, 0.97, [0.9], ["optimizer.lr", "optimizer.momentum"]),
    (1, 16, None, 0.1, 0.0, [0.5] * 15 + [0.9], ["optimizer.lr"]),
    (1, 64, None, 0.1, 0.0, [0.5] * 7 + [0.9], ["optimizer.lr"]),
    (1, 256, None, 0.1, 0.0, [0.5] * 7 + [0.9], ["optimizer.lr"]),
    (1, 256, None, 0.5, 0.0, [0.5] * 9, ["optimizer.lr"]),  # never reaches it
    # Local SGD, H = 4: K·B = 64 and 256; rounds = syncs at the crossing (one per 4 steps).
    (4, 16, 4, 0.1, 0.9, [0.5] * 5 + [0.9], []),
    (16, 16, 4, 0.1, 0.9, [0.5, 0.9], []),
]


def _store(root: Path) -> Store:
    store = Store(root)
    planned = []
    for i, (workers, batch, period, lr, momentum, accs, keys) in enumerate(RUNS):
        config = RunConfig(name="steps", workers=workers, seed=0).to_dict()
        config["data"]["batch_size"] = batch
        config["optimizer"].update(lr=lr, momentum=momentum, nesterov=False)
        config["algorithm"] = {"name": "local_sgd", "period": period} if period else {"name": "minibatch_sgd"}
        run_id = f"run{i:02d}"
        write_run(store, run_id, config, _rows(accs, 1 / period if period else 0.0), "completed")
        planned.append({"run_id": run_id, **config, **({"search": {"keys": keys}} if keys else {})})
    store.write_plan({"study": "steps", "target": {"mnist1d_cnn": f"accuracy={TARGET}"}, "runs": planned})
    return store


def test_steps_to_result_is_the_first_strict_crossing_minimised_over_trials(tmp_path: Path) -> None:
    study = load(_store(tmp_path / "store").root)
    table = steps_table(study, goals(study, None))
    rows = {(r["curve"], r["global_batch"]): r for r in table.to_dict("records")}
    momentum = "minibatch_sgd [momentum searched]"
    plain = "minibatch_sgd [optimizer.momentum=0]"
    local_sgd = "local_sgd H=4 [optimizer.momentum=0.9]"
    assert sorted(rows) == sorted(
        [
            (momentum, 16),
            (momentum, 64),
            (momentum, 256),
            (plain, 16),
            (plain, 64),
            (plain, 256),
            (local_sgd, 64),
            (local_sgd, 256),
        ]
    )
    assert [rows[(momentum, b)]["steps"] for b in (16, 64, 256)] == [160, 40, 10]
    assert [rows[(momentum, b)]["reached"] for b in (16, 64, 256)] == [1, 2, 1]  # 0.8 == target: not reached
    assert [rows[(plain, b)]["steps"] for b in (16, 64, 256)] == [160, 80, 80]
    assert (rows[(plain, 256)]["reached"], rows[(plain, 256)]["trials"]) == (1, 2)
    best = rows[(momentum, 64)]
    assert (best["best_lr"], best["best_momentum"]) == (0.2, 0.8)
    assert best["best_metaparameters"] == "optimizer.lr=0.2, optimizer.momentum=0.8"
    assert [rows[(momentum, b)]["regime"] for b in (16, 64, 256)] == ["perfect scaling"] * 3
    assert [rows[(plain, b)]["slope"] for b in (16, 64, 256)] == pytest.approx([-0.5, -0.5, 0.0])
    assert [rows[(plain, b)]["regime"] for b in (16, 64, 256)] == [
        "diminishing returns",
        "diminishing returns",
        "maximal data parallelism",
    ]
    local = [rows[(local_sgd, b)] for b in (64, 256)]
    assert [r["steps"] for r in local] == [60, 20] and [r["rounds"] for r in local] == [15, 5]
    assert math.isnan(rows[(momentum, 16)]["rounds"])  # one worker: no communication round
    # --target overrides the study's table; a bare value is for the primary metric.
    assert set(steps_table(study, goals(study, "0.95"))["reached"]) == {0}


def test_regimes_follow_the_local_slope() -> None:
    slopes, marks = regimes([16, 32, 64, 128, 256], [100, 50, math.nan, 20, 19])
    assert slopes[:2] == pytest.approx([-1, -1]) and math.isnan(slopes[2])
    assert slopes[3] == pytest.approx(math.log(20 / 50) / math.log(4))
    assert marks == [
        "perfect scaling",
        "perfect scaling",
        "",
        "diminishing returns",
        "maximal data parallelism",
    ]
    alone, mark = regimes([16], [10])
    assert math.isnan(alone[0]) and mark == [""]


def test_the_steps_figures_and_section(tmp_path: Path) -> None:
    # make_report with a target is exercised in test_report.py (the cluster case).
    from localsgd.report import steps_plots
    from localsgd.report.render import Paragraph, to_markdown

    study = load(_store(tmp_path / "store").root)
    targets = goals(study, None)
    table = steps_table(study, targets)
    for draw in (steps_plots.steps_to_result, steps_plots.steps_normalised, steps_plots.best_metaparameters):
        plot = draw(table)
        assert plot.figure is not None and not plot.left_out
    local = steps_plots.local_sgd_steps(table)
    assert local.figure is not None
    assert [ax.get_title() for ax in local.figure.axes] == ["optimizer steps", "communication rounds"]
    alone = steps_plots.local_sgd_steps(table[table["workers"] == 1])
    assert alone.figure is None and alone.left_out == {"mnist1d_cnn": "no run of K>1 workers with a period H"}

    from localsgd.report.build import context
    from localsgd.report.section import Shown
    from localsgd.report.sections import steps_to_result

    parts = steps_to_result.parts(context(tmp_path / "store"))
    assert [d.stem for d in parts.figures] == [
        "steps_to_result",
        "steps_to_result_normalised",
        "best_metaparameters",
        "local_sgd_steps_to_result",
    ]
    assert list(parts.sheets) == ["steps_to_result"]
    blocks = list(parts.blocks)
    text = to_markdown([b for b in blocks if not isinstance(b, Shown)])
    assert "Target for mnist1d_cnn: test accuracy > 80%" in text
    assert "selected on the test split, as its runs hold no validation split." in text
    assert "| mnist1d_cnn | minibatch_sgd [momentum searched] | 1 | 64 | 64 | 2/2 | 1 | 40 |" in text
    assert "| mnist1d_cnn | minibatch_sgd [optimizer.momentum=0] | 1 | 256 | 256 | 1/2 | 1 | 80 |" in text
    assert (
        "| mnist1d_cnn | local_sgd H=4 [optimizer.momentum=0.9] | 16 | 16 | 256 | 1/1 | 1 | 20 | 0.2 | 5 |"
        in text
    )
    assert not any(isinstance(b, Paragraph) for b in blocks)


def test_the_evaluation_interval_is_not_a_setting(tmp_path: Path) -> None:
    # K = 1 evaluated every 100 steps and K = 4 every 25 (the same epochs) share a baseline.
    store = Store(tmp_path / "store")
    for i, (workers, every) in enumerate(((1, 100), (4, 25))):
        config = RunConfig(name="every", workers=workers).to_dict()
        config["train"]["eval_every"] = every
        write_run(store, f"run{i}", config, _rows([0.5, 0.9]), "completed")
    study = load(store.root)
    assert "setting" not in study.group_keys and set(study.runs["setting"]) == {""}


def _seeded_store(root: Path) -> Store:
    """Three trials (lr 0.1, 0.2, 0.4) x 3 seeds at one batch size. Validation crosses 0.8 at
    steps (10, 20, 30) for lr 0.1 (mean 20), (20, 30, 40) for lr 0.2 (mean 30), and never on
    lr 0.4's seed 2. Test crosses at step 40 on every run but lr 0.2's seed 0, which crosses
    at step 10: the minimum over seeds, or a selection on test, would pick lr 0.2."""
    crossings = {(0.1, 0): 10, (0.1, 1): 20, (0.1, 2): 30, (0.2, 0): 20, (0.2, 1): 30, (0.2, 2): 40}
    crossings |= {(0.4, 0): 10, (0.4, 1): 10, (0.4, 2): 99}
    store = Store(root)
    planned = []
    for (lr, seed), at in crossings.items():
        config = RunConfig(name="seeded", seed=seed).to_dict()
        config["data"]["batch_size"] = 16
        config["optimizer"]["lr"] = lr
        rows = []
        for step in (10, 20, 30, 40):
            test = 0.95 if (lr, seed) == (0.2, 0) or step >= 40 else 0.5
            rows.append(
                {
                    "step": step,
                    "epoch": step / 100,
                    "samples": 16 * step,
                    "wall_seconds": float(step),
                    "test_accuracy": test,
                    "test_loss": 1 - test,
                    "validation_accuracy": 0.9 if step >= at else 0.5,
                }
            )
        run_id = f"lr{lr}-s{seed}"
        write_run(store, run_id, config, rows, "completed")
        planned.append({"run_id": run_id, **config, "search": {"keys": ["optimizer.lr"]}})
    store.write_plan({"study": "seeded", "target": {"mnist1d_cnn": "accuracy=0.8"}, "runs": planned})
    return store


def test_steps_to_result_selects_on_validation_and_takes_seeds_as_replicates(tmp_path: Path) -> None:
    from localsgd.report.selection import selection

    study = load(_seeded_store(tmp_path / "store").root)
    assert selection(study).split("mnist1d_cnn") == "validation"
    (row,) = steps_table(study, goals(study, None)).to_dict("records")
    # Three trials of three seeds each, not nine trials; lr 0.4 misses on one seed.
    assert (row["trials"], row["seeds"], row["reached"], row["split"]) == (3, 3, 2, "validation")
    # The best trial by its mean over seeds, with the spread over seeds.
    assert (row["best_lr"], row["steps"], row["steps_std"]) == (0.1, pytest.approx(20.0), pytest.approx(10.0))
    # Its test accuracy beside it: at each seed's crossing (0.5: not yet on test), at the end.
    assert (row["test_at_result"], row["final_test"]) == (pytest.approx(0.5), pytest.approx(0.95))
    # On test, lr 0.2 has the best mean (10, 40, 40 -> 30); never the minimum over seeds (10).
    on_test = steps_table(study, goals(study, None), selection(study, "test")).to_dict("records")[0]
    assert (on_test["split"], on_test["best_lr"], on_test["steps"]) == ("test", 0.2, pytest.approx(30.0))
    with pytest.raises(ValueError, match="--select-on must be one of validation, test"):
        selection(study, "train")


def test_selection_falls_back_to_test_without_validation_values(tmp_path: Path) -> None:
    from localsgd.report.selection import selection

    study = load(_store(tmp_path / "store").root)  # rows without validation values
    chosen = selection(study)
    assert chosen.split("mnist1d_cnn") == "test"
    assert chosen.sentence("mnist1d_cnn").endswith("as its runs hold no validation split")
    assert set(steps_table(study, goals(study, None), chosen)["split"]) == {"test"}
