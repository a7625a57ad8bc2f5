"""The text study files expand to the seed's design: glue.toml at full scale (with
stand-ins for the model and data it expects), glue_tiny.toml and mlm_tiny.toml on the
fixtures."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from localsgd.studies.loading import load_study
from localsgd.util.checks import ConfigError

pytest.importorskip("transformers")

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def shape(study) -> Counter:
    return Counter(
        (
            r.workload_name,
            r.workload["data"].get("train_subset"),
            r.workers,
            r.algorithm["name"],
            r.train.precision,
            r.data.batch_size * r.workers * r.algorithm.get("steps", 1),
        )
        for r in study.runs
    )


def test_glue_is_the_seed_design(tmp_path, monkeypatch, text_fixtures):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"workload\.model\.path 'models/bert-base-uncased' does not exist"):
        load_study(STUDIES / "glue.toml")
    shutil.copytree(text_fixtures["mnli"], "data/MNLI")
    shutil.copytree(text_fixtures["squad"], "data/squad")
    shutil.copytree(text_fixtures["tokenizer"], "models/bert-base-uncased")
    shutil.copy(text_fixtures["model_config"], "models/bert-base-uncased/config.json")
    study = load_study(STUDIES / "glue.toml")
    counts = shape(study)
    assert len(study.runs) == 2 * 2 * 2 * 3 * 5  # tasks x subsets x precisions x seeds x configurations
    for task in ("mnli", "squad"):
        for subset in (4000, 40000):
            for precision in ("fp16", "bf16"):
                assert counts[(task, subset, 1, "minibatch_sgd", precision, 32)] == 3
                for k in (4, 8):
                    # Accumulation holds the update batch at 32; local SGD the worker batch.
                    assert counts[(task, subset, k, "gradient_accumulation", precision, 32)] == 3
                    assert counts[(task, subset, k, "local_sgd", precision, 32 * k)] == 3
    lrs = {(r.workload_name, r.algorithm["name"]): r.optimizer.lr for r in study.runs}
    assert lrs[("mnli", "local_sgd")] > lrs[("mnli", "minibatch_sgd")]  # local SGD's own rate
    assert {r.fixed for r in study.runs if r.algorithm["name"] == "gradient_accumulation"} == {"global_batch"}


@pytest.mark.parametrize("name", ["glue_tiny", "mlm_tiny"])
def test_tiny_studies_run_on_the_fixtures(tmp_path, monkeypatch, text_fixtures, name):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(
        text_fixtures["tokenizer"].parent, "studies_out/fixtures", ignore=shutil.ignore_patterns("cache")
    )
    study = load_study(STUDIES / f"{name}.toml")
    workers = sorted({r.workers for r in study.runs})
    if name == "glue_tiny":
        assert workers == [1, 2, 4] and len(study.runs) == 20 * 3  # 3 seeds
        assert {(r.workload_name, r.workload["data"]["train_subset"]) for r in study.runs} == {
            (t, s) for t in ("mnli", "squad") for s in (512, 2048)
        }
    else:
        assert workers == [1, 2, 4] and {r.algorithm["name"] for r in study.runs} == {
            "minibatch_sgd",
            "local_sgd",
        }


def test_stilt_tiny_is_seed_001s_design(tmp_path, monkeypatch, text_fixtures):
    """Continued pretraining with every way of training of seed 001, then each model (and
    the starting one) fine-tuned downstream, 3 seeds each."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(
        text_fixtures["tokenizer"].parent, "studies_out/fixtures", ignore=shutil.ignore_patterns("cache")
    )
    study = load_study(STUDIES / "stilt_tiny.toml")
    pretrain, finetune = study.stages
    ways = Counter(
        (r.algorithm["name"], r.workers, r.engine, r.engine_options.get("procs_per_device"))
        for r in pretrain.runs
    )
    assert ways == {
        ("minibatch_sgd", 1, "processes", None): 1,
        ("minibatch_sgd", 2, "processes", None): 1,
        ("minibatch_sgd", 4, "processes", None): 1,
        ("minibatch_sgd", 2, "hogwild", 2): 1,
        ("minibatch_sgd", 4, "hogwild", 4): 1,
        ("async_local_sgd", 2, "processes", None): 1,
        ("async_local_sgd", 4, "processes", None): 1,
    }
    assert {r.workload_name for r in pretrain.runs} == {"mlm"}
    assert finetune.source == "pretrain"
    assert sorted(r.seed for r in finetune.templates) == sorted(r.seed for r in finetune.runs) == [0, 1, 2]
    assert {r.workload_name for r in finetune.templates + finetune.runs} == {"classification"}
    assert {r.workload["model"]["path"] for r in finetune.runs} == {"studies_out/fixtures/bert_tiny"}
