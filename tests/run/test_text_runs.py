"""Training runs on the text workloads: bf16 autocast and the fp16 GradScaler in the
training loop, and the simulated engine on a transformers model (vmap cannot take BERT's
data-dependent mask handling: it loops over the replicas, and says so)."""

from __future__ import annotations

import json
import math

import pytest

from localsgd.run.config import run_config
from localsgd.run.training import train
from textdata import text_spec

pytest.importorskip("transformers")


def config(fx, **changes):
    base = {
        "workload": text_spec(fx, "mnli", train_subset=256, eval_subset=64),
        "data": {"batch_size": 16},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"name": "linear", "warmup_ratio": 0.1},
        "train": {"epochs": 1, "eval_every": 4, "max_steps": 6},
    }
    for key, value in changes.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return run_config(base)


@pytest.mark.parametrize(
    ("engine", "workers", "precision"), [("simulated", 2, "bf16"), ("processes", 1, "fp16")]
)
def test_text_run_under_autocast(tmp_path, text_fixtures, engine, workers, precision):
    run = config(text_fixtures, engine=engine, workers=workers, train={"precision": precision})
    status = train(run, tmp_path, 0, 1)
    assert status.status == "completed" and status.steps == 6
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 6]
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert 0.0 <= rows[-1]["metrics"]["accuracy_matched"] <= 1.0
    assert rows[0]["lr"] > rows[-1]["lr"] > 0  # linear decay after one warmup step
    if engine == "simulated":
        assert status.details["vectorized"] is False
        assert isinstance(status.details["fallback_reason"], str) and status.details["fallback_reason"]
        assert status.counters.syncs == 6  # mini-batch SGD, one per step


def test_a_run_exports_its_final_model_and_a_classifier_loads_its_encoder(tmp_path, text_fixtures):
    """STILT's hand-over: a masked-LM run leaves a save_pretrained folder with its
    tokenizer; a classification run loads it as [workload.model] path, with the encoder
    trained by the first run and a new head."""
    import torch
    from safetensors.torch import load_file

    from localsgd import workloads

    run = run_config(
        {
            "workload": {"name": "mlm", "model": {"path": str(text_fixtures["model"])}, "data": text_spec(text_fixtures, "mlm")["data"]},
            "data": {"batch_size": 8},
            "optimizer": {"name": "adamw", "lr": 3e-3},
            "train": {"epochs": 1, "eval_every": 5, "max_steps": 5},
        }
    )
    status = train(run, tmp_path, 0, 1)
    assert status.status == "completed"
    folder = tmp_path / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    exported = load_file(str(folder / "model.safetensors"))
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]  # the consensus model
    start = load_file(str(text_fixtures["model"] / "model.safetensors"))
    for name, tensor in exported.items():
        assert torch.equal(tensor, final[name]), name
    assert not torch.equal(exported["bert.embeddings.word_embeddings.weight"], start["bert.embeddings.word_embeddings.weight"])

    spec = text_spec(text_fixtures, "classification")
    spec["model"] = {"path": str(folder)}
    classifier = workloads.build(spec).make_model(0)
    state = classifier.state_dict()
    encoder = [k for k in state if k.startswith(("bert.embeddings.", "bert.encoder."))]
    assert len(encoder) == len([k for k in exported if k.startswith(("bert.embeddings.", "bert.encoder."))]) > 30
    for name in encoder:
        assert torch.equal(state[name], exported[name]), name
    assert not any(k.startswith(("classifier.", "bert.pooler.")) for k in exported)  # the head is new
    assert state["classifier.weight"].shape == (6, 32)
