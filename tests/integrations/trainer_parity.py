"""Run under ``torchrun --nproc-per-node 2`` (CPU, gloo): a tiny BERT trained by transformers'
``Trainer`` and by ``LocalSGDTrainer`` in several scenarios, and by ``localsgd.DataParallel``
in a bare loop on the batches the Trainer fed this rank; each rank saves what the tests
compare (``OUT/rank<r>.pt``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import set_seed

import localsgd
from localsgd.integrations.transformers import LocalSGDMixin
from localsgd.run.worker import exit_process

BATCH, LENGTH, VOCAB, LR = 4, 12, 50, 1e-2


class Rows(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert() -> torch.nn.Module:
    set_seed(0)
    config = AutoConfig.for_model(
        "bert", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=LENGTH, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return AutoModelForSequenceClassification.from_config(config)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


class Recorder(TrainerCallback):
    """This rank's parameters after every update (before any checkpoint is written)."""

    def __init__(self) -> None:
        self.trace: list[torch.Tensor] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.trace.append(flat(model))


class Recording:
    """Keeps the micro-batches this rank trained on, in order."""

    batches: list[dict[str, torch.Tensor]]

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        self.batches.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]


class RecordingTrainer(Recording, Trainer):
    pass


class RecordingLocalSGDTrainer(Recording, LocalSGDMixin, Trainer):
    pass


def arguments(out: Path, steps: int, **kwargs: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=8,
        max_steps=steps, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, max_grad_norm=1.0,
    )  # fmt: skip
    options.update(kwargs)
    return TrainingArguments(**options)


def train(
    cls: Any, args: TrainingArguments, data: Dataset, resume: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    model = tiny_bert()
    recorder = Recorder()
    trainer = cls(
        model=model, args=args, train_dataset=data, callbacks=[recorder],
        optimizers=(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0), None), **kwargs,
    )  # fmt: skip
    trainer.batches = []
    trainer.train(resume_from_checkpoint=resume)
    localsgd_cb = getattr(trainer, "localsgd", None)
    return {
        "final": flat(trainer.model),
        "trace": recorder.trace,
        "batches": trainer.batches,
        "stats": localsgd_cb.stats if localsgd_cb is not None else None,
        "wrapped": type(trainer.model_wrapped).__name__,
        "log": trainer.state.log_history,
        "trainer": trainer,
    }


def bare_loop(
    batches: list[dict[str, torch.Tensor]], micro: int, steps: int, algorithm: Any, bf16: bool = False
) -> dict[str, Any]:
    """What the Trainer does per update, written out: the loss over the update's labels
    (the model accepts ``num_items_in_batch``), clipping, AdamW, the linear schedule."""
    from transformers import get_linear_schedule_with_warmup

    model = tiny_bert()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps)
    trace = []
    with localsgd.DataParallel(model, optimizer, algorithm) as dp:
        for update in range(steps):
            group = batches[update * micro : (update + 1) * micro]
            count = sum(b["labels"].ne(-100).sum() for b in group)
            for batch in group:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(**batch, num_items_in_batch=count).loss
                loss.float().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            model.zero_grad()
            trace.append(flat(model))
    return {"final": flat(model), "trace": trace, "stats": dp.stats}


def main(out_root: str) -> None:
    out = Path(out_root)
    data, valid = Rows(96, seed=7), Rows(32, seed=8)
    results: dict[str, Any] = {}

    # (a) mini-batch SGD through the integration against the plain Trainer (DDP).
    plain = train(RecordingTrainer, arguments(out / "plain", 6), data)
    mb = train(RecordingLocalSGDTrainer, arguments(out / "mb", 6), data, algorithm={"name": "minibatch_sgd"})
    results["plain"] = {k: plain[k] for k in ("final", "trace", "wrapped")}
    results["minibatch"] = {k: mb[k] for k in ("final", "trace", "stats", "wrapped")}

    # (b, d) local SGD, H = 4 over 6 updates, a checkpoint (and an evaluation) at 3 and 6,
    # then the consensus saved by save_model; against the bare loop on the same batches.
    run_dir = out / "local"
    local = train(
        RecordingLocalSGDTrainer,
        arguments(run_dir, 6, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3),
        data, eval_dataset=valid, algorithm=localsgd.algorithms.LocalSGD(period=4),
    )  # fmt: skip
    local["trainer"].save_model(str(out / "saved"))
    dist.barrier()
    results["local"] = {k: local[k] for k in ("final", "trace", "stats")}
    results["local"]["bare"] = bare_loop(local["batches"], 1, 6, {"name": "local_sgd", "period": 4})
    results["local"]["evals"] = [e["eval_loss"] for e in local["log"] if "eval_loss" in e]
    results["local"]["logged"] = [e for e in local["log"] if "localsgd/syncs" in e]
    results["local"]["checkpoint3"] = flat_file(run_dir / "checkpoint-3" / "model.safetensors")
    results["local"]["saved"] = flat_file(out / "saved" / "model.safetensors")
    results["local"]["files3"] = sorted(os.listdir(run_dir / "checkpoint-3"))
    results["local"]["eval3_of_checkpoint"] = eval_loss(run_dir / "checkpoint-3", valid)

    # (e) resume from checkpoint-3 (mid-period: the replicas and their Adam moments differ).
    resumed = train(
        RecordingLocalSGDTrainer, arguments(out / "resumed", 6), data,
        resume=str(run_dir / "checkpoint-3"), algorithm=localsgd.algorithms.LocalSGD(period=4),
    )  # fmt: skip
    results["resumed"] = {k: resumed[k] for k in ("final", "trace", "stats")}

    # (c) gradient accumulation: 2 micro-batches per update, 8 updates, H = 4.
    accumulated = train(
        RecordingLocalSGDTrainer, arguments(out / "accumulated", 8, per_device_train_batch_size=BATCH // 2,
                                            gradient_accumulation_steps=2),
        data, algorithm={"name": "local_sgd", "period": 4},
    )  # fmt: skip
    results["accumulated"] = {k: accumulated[k] for k in ("final", "stats")}
    # Mini-batch SGD under accumulation: DDP averages on each update's last micro-batch only.
    half = {"per_device_train_batch_size": BATCH // 2, "gradient_accumulation_steps": 2}
    plain_acc = train(RecordingTrainer, arguments(out / "plain-acc", 4, **half), data)
    mb_acc = train(
        RecordingLocalSGDTrainer,
        arguments(out / "mb-acc", 4, **half),
        data,
        algorithm={"name": "minibatch_sgd"},
    )
    results["accumulated"]["plain_minibatch"] = plain_acc["final"]
    results["accumulated"]["minibatch"] = {k: mb_acc[k] for k in ("final", "stats")}
    results["accumulated"]["bare"] = bare_loop(
        accumulated["batches"], 2, 8, {"name": "local_sgd", "period": 4}
    )

    # bf16 autocast on the CPU, H = 2 over 4 updates.
    bf16 = train(
        RecordingLocalSGDTrainer,
        arguments(out / "bf16", 4, bf16=True),
        data,
        algorithm={"name": "local_sgd", "period": 2},
    )
    results["bf16"] = {k: bf16[k] for k in ("final", "stats")}
    results["bf16"]["bare"] = bare_loop(bf16["batches"], 1, 4, {"name": "local_sgd", "period": 2}, bf16=True)

    # Another algorithm, with state of its own (the anchor and outer momentum): DiLoCo with
    # H = 2 over 6 updates, against the bare loop, and resumed from a mid-period checkpoint.
    diloco = {"name": "diloco", "period": 2, "outer_lr": 0.7, "outer_momentum": 0.9}
    first = train(
        RecordingLocalSGDTrainer,
        arguments(out / "diloco", 6, save_strategy="steps", save_steps=3),
        data,
        algorithm=diloco,
    )
    again = train(
        RecordingLocalSGDTrainer,
        arguments(out / "diloco-resumed", 6),
        data,
        resume=str(out / "diloco" / "checkpoint-3"),
        algorithm=diloco,
    )
    results["diloco"] = {k: first[k] for k in ("final", "trace", "stats")}
    results["diloco"]["bare"] = bare_loop(first["batches"], 1, 6, diloco)
    results["diloco"]["resumed"] = {k: again[k] for k in ("final", "trace", "stats")}

    # torch.compile wraps the DDP model (the "eager" backend: dynamo without code generation).
    compiled = train(
        RecordingLocalSGDTrainer,
        arguments(out / "compiled", 4, torch_compile=True, torch_compile_backend="eager"),
        data,
        algorithm={"name": "local_sgd", "period": 4},
    )
    results["compiled"] = {k: compiled[k] for k in ("final", "stats", "wrapped")}
    results["compiled"]["bare"] = bare_loop(compiled["batches"], 1, 4, {"name": "local_sgd", "period": 4})

    results["world_size"] = dist.get_world_size()
    rank = dist.get_rank()
    torch.save(results, out / f"rank{rank}.pt.tmp")
    os.replace(out / f"rank{rank}.pt.tmp", out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown, which can abort a finished gloo process.
    exit_process(0)


def flat_file(path: Path) -> torch.Tensor:
    """A saved model's parameters, in the model's order."""
    tensors = load_file(str(path))
    names = [n for n, _ in tiny_bert().named_parameters()]
    return torch.cat([tensors[n].reshape(-1) for n in names])


def eval_loss(folder: Path, data: Rows) -> float:
    """The loss of a saved model on the whole of ``data``, in this process alone."""
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        losses = [
            model(input_ids=data.ids[i : i + 8], labels=data.labels[i : i + 8]).loss
            for i in range(0, len(data), 8)
        ]
    return float(torch.stack(losses).mean())


if __name__ == "__main__":
    main(sys.argv[1])
