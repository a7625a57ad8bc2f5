"""Run-config tables on the tiny text fixtures (see the ``text_fixtures`` fixture)."""

from __future__ import annotations

from pathlib import Path


def text_spec(fx: dict[str, Path], name: str, **data: object) -> dict[str, object]:
    """A ``[workload]`` table of ``name`` on the fixtures, the tiny BERT initialised at random."""
    path = {
        "mnli": fx["mnli"],
        "squad": fx["squad"],
        "mlm": fx["corpus"] / "train.txt",
        "classification": fx["classification"],
    }[name]
    options: dict[str, object] = {"path": str(path), "max_length": 64, "cache": str(fx["cache"]), **data}
    if name == "mlm":
        options.setdefault("eval_path", str(fx["corpus"] / "valid.txt"))
    if name == "squad":
        options.setdefault("doc_stride", 16)
    model = {"config": str(fx["model_config"]), "tokenizer": str(fx["tokenizer"])}
    return {"name": name, "model": model, "data": options}
