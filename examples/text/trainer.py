"""Fine-tune a transformers model on MNLI or SQuAD with ``Trainer`` and any localsgd algorithm.

    torchrun --nproc-per-node 2 examples/text/trainer.py --task mnli --data_dir fixtures/mnli \\
        --config_name fixtures/bert_tiny.json --tokenizer_name fixtures/tokenizer \\
        --algorithm '{"name": "local_sgd", "period": 8}' \\
        --output_dir out/mnli --max_steps 200 --per_device_train_batch_size 32 --learning_rate 5e-5 \\
        --save_steps 100

(``localsgd fixtures fixtures`` writes the tiny files; without CUDA the processes run on
the CPU with gloo.) Every ``TrainingArguments`` flag works as usual (``--bf16``,
``--gradient_accumulation_steps``, ``--save_steps``, ``--resume_from_checkpoint``, ...).

A plain Trainer script, with one change: ``LocalSGDTrainer(..., algorithm=...)`` in place of
``Trainer(...)``. Checkpoints carry each process's local SGD state, so
``--resume_from_checkpoint`` continues exactly; ``save_model`` writes the consensus model.
Data, tokenisation (cached) and the metrics come from localsgd's ``mnli`` / ``squad``
workloads, so the numbers match a ``localsgd study`` of the same configuration.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import HfArgumentParser, TrainingArguments

import localsgd
from localsgd import algorithms, workloads
from localsgd.integrations.transformers import LocalSGDTrainer

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    task: str = field(metadata={"help": "mnli or squad", "choices": ["mnli", "squad"]})
    data_dir: str = field(metadata={"help": "GLUE MNLI tsv folder, or SQuAD v1.1 json folder"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "a local checkpoint folder"})
    config_name: str | None = field(default=None, metadata={"help": "a config.json for a random model"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "a local tokenizer folder"})
    max_length: int = 128
    doc_stride: int = field(default=32, metadata={"help": "SQuAD: overlap of context windows"})
    train_subset: int | None = field(default=None, metadata={"help": "train on N examples"})
    eval_subset: int | None = field(default=None, metadata={"help": "evaluate on the first N examples"})
    algorithm: str = field(
        default='{"name": "local_sgd", "period": 8}', metadata={"help": "a localsgd algorithm as JSON"}
    )


class Rows(Dataset):
    """The workload's tokenised training tensors, one dict of tensors per example."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i].long() for k, v in self.tensors.items()}


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    # Without CUDA, use_cpu lets several processes train together on gloo.
    parser.set_defaults(use_cpu=not torch.cuda.is_available())
    script, training = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s", level=logging.INFO)

    # Data and metrics: the localsgd workload (tokenised once, cached on disk).
    model_options: dict[str, Any] = {"tokenizer": script.tokenizer_name} if script.tokenizer_name else {}
    if script.model_name_or_path:
        model_options["path"] = script.model_name_or_path
    else:
        model_options["config"] = script.config_name
    data_options: dict[str, Any] = {"path": script.data_dir, "max_length": script.max_length}
    for key in ("train_subset", "eval_subset"):
        if getattr(script, key) is not None:
            data_options[key] = getattr(script, key)
    if script.task == "squad":
        data_options["doc_stride"] = script.doc_stride
    with training.main_process_first(desc="tokenising"):  # one process tokenises, the others read the cache
        workload = workloads.build({"name": script.task, "model": model_options, "data": data_options})

    algorithm = algorithms.build(json.loads(script.algorithm))
    trainer = LocalSGDTrainer(
        model=workload.make_model(training.seed),
        args=training,
        train_dataset=Rows(workload.train),
        processing_class=workload.tokenizer,
        algorithm=algorithm,
    )
    result = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model()  # every process calls it; the main one writes the consensus model

    if trainer.is_world_process_zero():
        summary = {
            "task": script.task,
            "algorithm": algorithm.to_dict(),
            "processes": training.world_size,
            "updates": result.global_step,
            "train_loss": result.training_loss,
            "stats": trainer.localsgd.stats,
            "metrics": workload.evaluate(trainer.model, training.device),
        }
        logger.info("results: %s", json.dumps(summary))
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
    # Done: everything written and printed. Leave without the interpreter's teardown, which
    # can abort a finished gloo worker (SIGABRT) and make the launcher report a failure.
    localsgd.exit_process(0)
