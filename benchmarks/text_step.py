"""What localsgd costs around a transformers training step, at K = 2 on gloo, against the
references a user of accelerate would otherwise run. For a BERT-base-sized encoder (110 M
parameters, 12 layers) and the fixtures' tiny BERT, the same two processes time,
interleaved (blocks whose order rotates, medians after warm-up, the slowest rank's median):

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
    python benchmarks/text_step.py --quick    # tiny model only, few repetitions
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

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
            spec.update(reps=min(spec["reps"], 8), warmup=1)
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
            "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        }
    with open(out, "w") as f:
        json.dump(results, f)
    accelerator.end_training()


def interleaved(methods: dict[str, Callable[[], Any]], spec: dict[str, Any]) -> dict[str, list[float]]:
    """Each method's times, in blocks whose order rotates (the same order on every rank);
    a barrier before each call, so a collective's time is its own."""
    times: dict[str, list[float]] = {k: [] for k in methods}
    order = list(methods)
    for rep in range(spec["warmup"] + spec["reps"]):
        shift = rep % len(order)
        for key in order[shift:] + order[:shift]:
            torch.distributed.barrier()
            start = time.perf_counter()
            methods[key]()
            elapsed = time.perf_counter() - start
            if rep >= spec["warmup"]:
                times[key].append(elapsed)
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only, few repetitions")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/text_step.json)")
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
    summary: dict[str, Any] = {
        "benchmark": "text_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "world_size": world,
        "backend": "gloo",
        "threads_per_rank": 1,
        "models": {},
    }
    for name in names:
        slowest = {
            k: max(r[name]["median_seconds"][k] for r in ranks) for k in ranks[0][name]["median_seconds"]
        }
        ratios = {
            label: {"ratio": slowest[a] / slowest[b], "target": target, "numerator": a, "denominator": b}
            for label, (a, b, target) in PAIRS.items()
        }
        info = {k: v for k, v in ranks[0][name].items() if k != "median_seconds"}
        summary["models"][name] = {**info, "median_seconds": slowest, "ratios": ratios}
        print(
            f"{name}: {info['parameters'] / 1e6:.2f} M parameters in {info['tensors']} tensors, batch {info['batch']}x{info['length']}"
        )
        for label, r in ratios.items():
            target = f" (target <= {r['target']})" if r["target"] else ""
            print(f"  {label}: {r['ratio']:.3f}{target}")
        for key, seconds in slowest.items():
            print(f"    {key}: {seconds * 1e3:.1f} ms")
    path = args.out or RESULTS / ("text_step.quick.json" if args.quick else "text_step.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
