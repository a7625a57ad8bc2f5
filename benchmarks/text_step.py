"""What localsgd costs around a transformers training step, at K = 2 on gloo, against the
references a user of accelerate would otherwise run.

For a BERT-base-sized encoder (110 M parameters, 12 layers) and the fixtures' tiny BERT, the same two processes time,
interleaved (each repetition runs every variant once, in an order that rotates, after
warm-up; >= 5 repetitions; a repetition's time is its slowest rank's, and every ratio is
taken within a repetition and reported as median and range):

- ``dp_step``: a training step (AdamW) of the plain model inside ``DataParallel`` with
  ``LocalSGD(period=10**9)`` (no sync ever due), against ``bare_step``, the same step of a
  twin model outside it. Target: ratio <= 1.03. ``bare2_step``, a second bare twin, gives
  the A/A ratio: the noise floor of the machine.
- ``ours_sync``: one local-SGD averaging (one flat all-reduce per dtype), against
  ``accelerate_sync``: accelerate's ``LocalSGD._sync_and_avg_model_params`` (one
  all-reduce per tensor, on clones) on the DDP model ``accelerator.prepare`` returned.
- ``ours_ddp_step``: a mini-batch SGD step of a DDP model inside ``DataParallel`` (DDP's
  bucketed all-reduce does the averaging), against ``ddp_step``: the same step of a plain
  DDP twin. Target: ratio <= 1.05.

BERT-base's forward and backward on two shared CPU cores is slow, so the step uses a small
batch (2 sequences of 32 tokens) and few repetitions; the tiny model uses 8 of 32. Nothing
is asserted: this is a measurement.

    python benchmarks/text_step.py            # writes benchmarks/results/text_step.json
    python benchmarks/text_step.py --quick    # tiny model only, 3 repetitions, no JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from shared import interleaved as rotated
from shared import machine_at_end, ratio, ratio_line, write_results

from localsgd.run.worker import exit_process

MODELS: dict[str, dict[str, Any]] = {
    "bert_base": {
        "config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522},
        "batch": 2,
        "length": 32,
        "reps": 8,
        "warmup": 1,
    },
    "bert_tiny": {
        "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 560},
        "batch": 8,
        "length": 32,
        "reps": 60,
        "warmup": 5,
    },
}  # fmt: skip
PAIRS = {
    "A/A: bare step / its bare twin (the noise floor)": ("bare2_step", "bare_step", None),
    "step in DataParallel, no sync due / bare step": ("dp_step", "bare_step", 1.03),
    "local-SGD sync / accelerate LocalSGD sync": ("ours_sync", "accelerate_sync", None),
    "mini-batch SGD via our DDP path / plain DDP step": ("ours_ddp_step", "ddp_step", 1.05),
}


def build(spec: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", num_labels=3, max_position_embeddings=128, **spec["config"])
    return AutoModelForSequenceClassification.from_config(config)


def rank_main(rank: int, world: int, port: int, names: list[str], quick: bool, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.local_sgd import LocalSGD as AccelerateLocalSGD
    from torch.nn.parallel import DistributedDataParallel

    import localsgd
    from localsgd import algorithms

    accelerator = Accelerator(cpu=True)  # initialises the gloo world both sides use
    results: dict[str, Any] = {}
    for name in names:
        spec = dict(MODELS[name])
        if quick:
            spec.update(reps=3, warmup=1)
        g = torch.Generator().manual_seed(rank)
        batch = {
            "input_ids": torch.randint(
                5, spec["config"]["vocab_size"], (spec["batch"], spec["length"]), generator=g
            ),
            "labels": torch.randint(0, 3, (spec["batch"],), generator=g),
        }
        base = build(spec)

        def step(model: torch.nn.Module, batch: dict[str, torch.Tensor] = batch) -> Callable[[], None]:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def run() -> None:
                opt.zero_grad()
                model(**batch).loss.backward()
                opt.step()

            run.optimizer = opt  # type: ignore[attr-defined]
            return run

        times: dict[str, list[float]] = {}
        # Three phases, each with only its own models alive (BERT-base with AdamW state is
        # 1.8 GB a copy), each timed interleaved.
        # 1. The step inside DataParallel (no sync due) against two bare twins (A/A: noise).
        bare, bare2, dp_model = (copy.deepcopy(base) for _ in range(3))
        dp_step = step(dp_model)
        with localsgd.DataParallel(dp_model, dp_step.optimizer, algorithms.LocalSGD(period=10**9)):  # type: ignore[attr-defined]
            times |= interleaved(
                {"bare_step": step(bare), "bare2_step": step(bare2), "dp_step": dp_step}, spec
            )
        del bare, bare2, dp_model, dp_step
        # 2. One local-SGD averaging against accelerate's (on the DDP model prepare returns).
        ours_model = copy.deepcopy(base)
        prepared = accelerator.prepare(copy.deepcopy(base))
        theirs = AccelerateLocalSGD(accelerator=accelerator, model=prepared, local_sgd_steps=1)
        opt = torch.optim.SGD(ours_model.parameters(), lr=0.0)
        with localsgd.DataParallel(ours_model, opt, algorithms.LocalSGD(period=1)) as dp:
            sync = dp._sync.averager  # type: ignore[union-attr]
            times |= interleaved(
                {"ours_sync": sync, "accelerate_sync": theirs._sync_and_avg_model_params}, spec
            )
        del ours_model, prepared, theirs, opt
        # 3. Mini-batch SGD: a DDP model inside DataParallel against a plain DDP twin.
        ddp, ours_ddp = (
            DistributedDataParallel(copy.deepcopy(base)),
            DistributedDataParallel(copy.deepcopy(base)),
        )
        ddp_step, ours_ddp_step = step(ddp), step(ours_ddp)
        with localsgd.DataParallel(ours_ddp, ours_ddp_step.optimizer, algorithms.MiniBatchSGD()):  # type: ignore[attr-defined]
            times |= interleaved({"ddp_step": ddp_step, "ours_ddp_step": ours_ddp_step}, spec)
        del ddp, ours_ddp, ddp_step, ours_ddp_step
        results[name] = {
            "parameters": sum(p.numel() for p in base.parameters()),
            "tensors": len(list(base.parameters())),
            "batch": spec["batch"],
            "length": spec["length"],
            "reps": spec["reps"],
            "seconds": times,
        }
    with open(out, "w") as f:
        json.dump(results, f)
    accelerator.end_training()
    # Done: skip the interpreter's teardown, which can abort a finished gloo process
    # ("terminate called without an active exception", SIGABRT).
    exit_process(0)


def interleaved(methods: dict[str, Callable[[], Any]], spec: dict[str, Any]) -> dict[str, list[float]]:
    """Each method's seconds per repetition, interleaved (the same rotating order on every
    rank); a barrier before each call, so a collective's time is its own."""

    def timed(fn: Callable[[], Any]) -> Callable[[], float]:
        def one() -> float:
            torch.distributed.barrier()
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return one

    return rotated({k: timed(fn) for k, fn in methods.items()}, spec["reps"], warmup=spec["warmup"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only, few repetitions")
    args = parser.parse_args()
    names = ["bert_tiny"] if args.quick else ["bert_base", "bert_tiny"]
    ctx = mp.get_context("spawn")
    port, world = free_port(), 2
    with tempfile.TemporaryDirectory() as tmp:
        outs = [f"{tmp}/rank{r}.json" for r in range(world)]
        procs = [
            ctx.Process(target=rank_main, args=(r, world, port, names, args.quick, outs[r]))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(1800)
            if p.exitcode != 0:
                sys.exit(f"a rank failed (exit code {p.exitcode})")
        ranks = [json.loads(Path(o).read_text()) for o in outs]
    ratios: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    seconds_rows: list[list[Any]] = []
    models: dict[str, Any] = {}
    for name in names:
        # A repetition's time is its slowest rank's.
        keys = ranks[0][name]["seconds"]
        slowest = {k: [max(vals) for vals in zip(*(r[name]["seconds"][k] for r in ranks))] for k in keys}
        info = {k: v for k, v in ranks[0][name].items() if k != "seconds"}
        models[name] = {**info, "seconds": slowest}
        label = f"{MODEL_LABELS[name]} ({info['parameters'] / 1e6:.2f} M, {info['tensors']} tensors)"
        row: list[Any] = [label, f"{info['batch']} x {info['length']}", info["reps"]]
        for title, (a, b, target) in PAIRS.items():
            r = ratio(title, slowest[a], slowest[b], target=target, at_most=True, model=name)
            ratios.append(r)
            row.append(f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")
        rows.append(row)
        seconds_rows.append([label] + [f"{statistics.median(slowest[k]) * 1e3:.1f}" for k in SECONDS_COLUMNS])
        print(f"{name}: {info['parameters'] / 1e6:.2f} M parameters in {info['tensors']} tensors")
    for r in ratios:
        print(ratio_line(r))
    tables = [
        {
            "title": "Ratios of the slowest rank's times, median [min, max] over the repetitions",
            "columns": ["model", "batch (sequences x tokens)", "repetitions", *PAIRS],
            "rows": rows,
            "note": (
                "K = 2 on gloo, one thread per rank, AdamW. The A/A column (a bare step against its "
                "bare twin) is the noise floor: a step ratio no farther from 1 than it is noise."
            ),
        },
        {
            "title": "Median seconds of the slowest rank (ms)",
            "columns": ["model", *SECONDS_COLUMNS],
            "rows": seconds_rows,
            "note": "",
        },
    ]
    out = {
        "command": ["python", "benchmarks/text_step.py", *sys.argv[1:]],
        "quick": args.quick,
        "world_size": world,
        "backend": "gloo",
        "threads_per_rank": 1,
        "machine": machine_at_end(),
        "models": models,
        "ratios": ratios,
        "tables": tables,
    }
    write_results("text_step", out, args.quick)


MODEL_LABELS = {"bert_base": "BERT-base", "bert_tiny": "tiny BERT"}
SECONDS_COLUMNS = [
    "bare_step",
    "bare2_step",
    "dp_step",
    "ours_sync",
    "accelerate_sync",
    "ddp_step",
    "ours_ddp_step",
]


if __name__ == "__main__":
    main()
