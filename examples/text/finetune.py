"""Fine-tune a transformers model on MNLI or SQuAD with accelerate and any localsgd algorithm.

    accelerate launch --num_processes 2 examples/text/finetune.py --task mnli \\
        --data_dir fixtures/mnli --config_name fixtures/bert_tiny.json --tokenizer_name fixtures/tokenizer \\
        --algorithm '{"name": "local_sgd", "period": 8}'
    torchrun --nproc-per-node 2 examples/text/finetune.py --task squad --data_dir fixtures/squad ...

(``localsgd fixtures fixtures`` writes the tiny files; on CPU-only machines ``accelerate
launch --multi_gpu --num_processes 2`` starts the processes, which then run on gloo.)

In the style of transformers' ``run_glue_no_trainer.py`` / ``run_qa_no_trainer.py``: parse
arguments, build the accelerator, data, model, optimizer and scheduler, ``prepare`` them,
train, evaluate, save. The one change local SGD needs is the ``with LocalSGD(...)`` block;
the import is the only difference from accelerate's own ``LocalSGD``. Data, tokenisation
(cached) and the metrics come from localsgd's ``mnli`` / ``squad`` workloads, so the
numbers match a ``localsgd study`` of the same configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from transformers import get_linear_schedule_with_warmup

import localsgd
from localsgd import algorithms, workloads
from localsgd.integrations.accelerate import LocalSGD

logger = logging.getLogger(__name__)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fine-tune on MNLI or SQuAD with accelerate + localsgd.")
    p.add_argument("--task", choices=["mnli", "squad"], required=True)
    p.add_argument("--data_dir", required=True, help="GLUE MNLI tsv folder, or SQuAD v1.1 json folder")
    p.add_argument("--model_name_or_path", help="a local checkpoint folder")
    p.add_argument("--config_name", help="a config.json for a randomly initialised model")
    p.add_argument("--tokenizer_name", help="a local tokenizer folder (default: the checkpoint's)")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--doc_stride", type=int, default=32, help="SQuAD: overlap of context windows")
    p.add_argument("--train_subset", type=int, help="train on N examples (the 4K/40K subsets)")
    p.add_argument("--eval_subset", type=int, help="evaluate on the first N examples")
    p.add_argument("--per_device_train_batch_size", type=int, default=32)
    p.add_argument("--per_device_eval_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--num_train_epochs", type=float, default=3.0)
    p.add_argument("--max_train_steps", type=int, help="overrides the epochs")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument(
        "--algorithm", default='{"name": "local_sgd", "period": 8}', help="a localsgd algorithm as JSON"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", help="where the model, tokenizer and results.json go")
    return p.parse_args()


class Rows(Dataset):
    """The workload's tokenised training tensors, one dict of tensors per example."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i].long() for k, v in self.tensors.items()}


def main() -> None:
    args = parse_args()
    # Without CUDA, cpu=True lets accelerate run several processes on gloo (MULTI_CPU).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.INFO)
    logger.info(accelerator.state)
    set_seed(args.seed)

    # Data and metrics: the localsgd workload (tokenised once, cached on disk).
    model_options: dict[str, Any] = {"tokenizer": args.tokenizer_name} if args.tokenizer_name else {}
    if args.model_name_or_path:
        model_options["path"] = args.model_name_or_path
    else:
        model_options["config"] = args.config_name
    data_options: dict[str, Any] = {"path": args.data_dir, "max_length": args.max_length}
    for key in ("train_subset", "eval_subset"):
        if getattr(args, key) is not None:
            data_options[key] = getattr(args, key)
    if args.task == "squad":
        data_options["doc_stride"] = args.doc_stride
    with accelerator.main_process_first():  # one process tokenises, the others read the cache
        workload = workloads.build(
            {
                "name": args.task,
                "model": model_options,
                "data": data_options,
                "eval_batch_size": args.per_device_eval_batch_size,
            }
        )
    train_dataloader = DataLoader(
        Rows(workload.train), batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True
    )

    model = workload.make_model(args.seed)
    no_decay = ("bias", "LayerNorm.weight")
    grouped = [
        {
            "params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
            "weight_decay": args.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(grouped, lr=args.learning_rate)

    updates_per_epoch = math.ceil(
        len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps
    )
    max_train_steps = args.max_train_steps or math.ceil(args.num_train_epochs * updates_per_epoch)
    lr_scheduler = get_linear_schedule_with_warmup(optimizer, args.num_warmup_steps, max_train_steps)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    algorithm = algorithms.build(json.loads(args.algorithm))
    logger.info(
        "training %d updates with %s on %d processes",
        max_train_steps,
        algorithm.label(),
        accelerator.num_processes,
    )

    completed = 0
    start = time.perf_counter()
    model.train()
    with LocalSGD(accelerator=accelerator, model=model, algorithm=algorithm) as local_sgd:
        while completed < max_train_steps:
            for batch in train_dataloader:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                    local_sgd.step()
                if accelerator.sync_gradients:
                    completed += 1
                    if completed >= max_train_steps:
                        break
    # Leaving the block averaged the replicas: every process holds the consensus model.
    train_seconds = time.perf_counter() - start

    results: dict[str, Any] = {
        "task": args.task,
        "algorithm": algorithm.to_dict(),
        "processes": accelerator.num_processes,
        "updates": completed,
        "train_seconds": train_seconds,
        "stats": local_sgd.stats,
    }
    if accelerator.is_main_process:
        results["metrics"] = workload.evaluate(accelerator.unwrap_model(model), accelerator.device)
        logger.info("results: %s", json.dumps(results))
        print(json.dumps(results), flush=True)
        if args.output_dir:
            out = Path(args.output_dir)
            accelerator.unwrap_model(model).save_pretrained(out)
            workload.tokenizer.save_pretrained(out)
            (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
    # Done: everything written and printed. Leave without the interpreter's teardown, which
    # can abort a finished gloo worker (SIGABRT) and make the launcher report a failure.
    localsgd.exit_process(0)
