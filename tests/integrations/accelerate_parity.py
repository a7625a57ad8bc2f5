"""Run under ``accelerate launch --cpu --num_processes 2``: the same tiny BERT and data
trained with accelerate's LocalSGD and with localsgd's drop-in; each rank saves what the
test compares (``OUT/rank<r>.pt``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.local_sgd import LocalSGD as AccelerateLocalSGD
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset

from localsgd.integrations.accelerate import LocalSGD

STEPS, H, BATCH, LENGTH, VOCAB = 6, 4, 8, 12, 50


def model_and_data(seed: int) -> tuple[torch.nn.Module, TensorDataset]:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    set_seed(seed)
    config = AutoConfig.for_model(
        "bert",
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = AutoModelForSequenceClassification.from_config(config)
    g = torch.Generator().manual_seed(7)
    n = STEPS * BATCH * 2
    data = TensorDataset(
        torch.randint(4, VOCAB, (n, LENGTH), generator=g), torch.randint(0, 3, (n,), generator=g)
    )
    return model, data


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def train(
    accelerator: Accelerator, cls: Any, micro: int = 1, steps: int = H, **kwargs: Any
) -> dict[str, Any]:
    accelerator.gradient_accumulation_steps = micro
    model, data = model_and_data(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(data, batch_size=BATCH // micro, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    trace = []
    with cls(accelerator=accelerator, model=model, local_sgd_steps=steps, **kwargs) as local_sgd:
        for i, (ids, labels) in enumerate(loader):
            if i == STEPS * micro:
                break
            with accelerator.accumulate(model):
                loss = model(input_ids=ids, labels=labels).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                local_sgd.step()
            trace.append(flat(accelerator.unwrap_model(model)))
    return {
        "final": flat(accelerator.unwrap_model(model)),
        "trace": trace,
        "stats": getattr(local_sgd, "stats", None),
    }


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    results = {
        "accelerate": train(accelerator, AccelerateLocalSGD),
        "localsgd": train(accelerator, LocalSGD),
        "minibatch": train(accelerator, LocalSGD, algorithm={"name": "minibatch_sgd"}),
        # Under accumulation accelerate's class counts micro-batches, ours optimizer updates.
        "accumulated": train(accelerator, LocalSGD, micro=2),
        "accumulated_accelerate": train(accelerator, AccelerateLocalSGD, micro=2, steps=2 * H),
        "world_size": accelerator.num_processes,
    }
    torch.save(results, Path(out) / f"rank{accelerator.process_index}.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
