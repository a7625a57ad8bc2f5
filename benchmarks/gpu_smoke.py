"""The GPU path in one short script, for the first time a GPU machine is at hand.

Runs, each as a real run recorded in a temporary store, and prints what it measured:

1. the process engine on CUDA with NCCL: K = the GPUs there are (at most 4; one GPU: a
   world of one, which still starts NCCL), local SGD, mnist1d_cnn;
2. the simulated engine with K = 8 replicas stacked on one GPU, fp32, bf16 and fp16
   (autocast; fp16 with a loss scaler), steps per second of each: the precisions
   interleaved (each repetition runs each once, in an order that rotates), 5 repetitions,
   bf16 and fp16 against fp32 as median and range;
3. ImageNet-format data (generated JPEGs) through the DataLoader pipeline (worker
   processes, pinned memory, non-blocking copies) into ResNet-50 in bf16: images per second.

``--cpu`` is the reduced mode the test suite runs: gloo, the CPU, fp32 and bf16, tiny sizes,
one repetition.
Ready to run as ``python benchmarks/gpu_smoke.py`` on a GPU machine (about 2 to 4 minutes);
writes ``benchmarks/results/gpu_smoke.json`` (``--out`` elsewhere; ``--cpu`` writes only where
``--out`` says).

    python benchmarks/gpu_smoke.py                        # on a machine with CUDA
    python benchmarks/gpu_smoke.py --cpu --out FILE.json  # the reduced mode, on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from shared import MIN_REPS, interleaved, machine_at_end, ratio, ratio_line

from localsgd.records.store import Store
from localsgd.run.config import run_config
from localsgd.run.execute import execute_run, preflight

RESULTS = Path(__file__).resolve().parent / "results"


def run(store: Store, spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec`` through its engine; its status, steps, training seconds and final
    primary metric."""
    config = run_config(spec)
    workload = next(iter(preflight([config]).values()))
    status = execute_run(config, store, workload=workload)
    info = store.final_status(config.run_id())
    if info is None or status != "completed":
        error = store.error(config.run_id())
        raise SystemExit(f"{spec['name']}: {status}: {error.line() if error else 'no status'}")
    primary = info.primary
    return {
        "name": spec["name"],
        "status": status,
        "steps": info.steps,
        "train_seconds": info.wall_seconds,
        "steps_per_second": info.steps / info.wall_seconds if info.wall_seconds else None,
        primary: info.final.metrics.get(primary) if info.final else None,
    }


def base(name: str, device: str, steps: int, **more: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "device": device,
        "workload": {"name": "mnist1d_cnn", "num_samples": 4000},
        "data": {"batch_size": 32},
        "train": {"epochs": 100, "max_steps": steps, "eval_every": steps},
        "algorithm": {"name": "local_sgd", "period": 4},
    }
    spec.update(more)
    return spec


def write_jpegs(folder: Path, classes: int, per_class: int, size: tuple[int, int]) -> None:
    """An ImageNet-format folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of real JPEGs."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            out = folder / split / f"n{c:08d}"
            out.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
                pixels[..., c % 3] = pixels[..., c % 3] // 2 + 128  # a colour per class
                Image.fromarray(pixels.numpy()).save(out / f"{split}_{c}_{i}.JPEG", quality=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="reduced mode on the CPU (gloo, fp32/bf16, tiny)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("no CUDA device: run with --cpu for the reduced mode", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    gpus = torch.cuda.device_count() if cuda else 0
    steps = 200 if cuda else 12
    found: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus": gpus,
        "nccl": bool(cuda and torch.distributed.is_nccl_available()),
        "runs": [],
    }
    print(f"torch {found['torch']}, {found['device']}, {gpus} GPU(s), NCCL {found['nccl']}")
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        store = Store(Path(tmp) / "store")
        workers = max(1, min(gpus, 4)) if cuda else 2
        rows = [
            run(store, base(f"processes K={workers}", device, steps, workers=workers, engine="processes"))
        ]
        precisions = ("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16")
        done: dict[str, int] = dict.fromkeys(precisions, 0)

        def simulated(precision: str) -> Callable[[], float]:
            def one() -> float:
                # A seed per repetition: each is a run of its own in the store.
                spec = base(
                    f"simulated K=8 {precision}",
                    device,
                    steps,
                    workers=8,
                    engine="simulated",
                    seed=done[precision],
                )
                spec["train"]["precision"] = precision
                done[precision] += 1
                rows.append(run(store, spec))
                return float(rows[-1]["steps_per_second"])

            return one

        rates = interleaved({p: simulated(p) for p in precisions}, MIN_REPS if cuda else 1)
        data = Path(tmp) / "imagenet"
        write_jpegs(data, classes=4, per_class=64 if cuda else 6, size=(320, 240) if cuda else (64, 48))
        imagenet = {
            "name": "imagenet_resnet50",
            "data_path": str(data),
            "image_size": 160 if cuda else 32,
            "eval_resize": 182 if cuda else 36,
            "loader_workers": 4 if cuda else 0,
        }
        spec = base(
            "imagenet_resnet50 " + ("bf16" if cuda else "fp32"),
            device,
            30 if cuda else 3,
            workers=1,
            engine="processes",
            workload=imagenet,
            data={"batch_size": 32 if cuda else 4},
            algorithm={"name": "minibatch_sgd"},
        )
        spec["train"]["precision"] = "bf16" if cuda else "fp32"
        started = time.perf_counter()
        row = run(store, spec)
        row["images_per_second"] = row["steps"] * spec["data"]["batch_size"] / row["train_seconds"]
        row["seconds_with_setup"] = time.perf_counter() - started
        rows.append(row)
    found["runs"] = rows
    print(f"\n{'run':28} {'steps':>6} {'train s':>8} {'steps/s':>8}  final")
    for r in rows:
        final = {
            k: v
            for k, v in r.items()
            if k not in ("name", "status", "steps", "train_seconds", "steps_per_second")
        }
        print(
            f"{r['name']:28} {r['steps']:>6} {r['train_seconds']:>8.2f} {r['steps_per_second'] or 0:>8.1f}  {final}"
        )
    ratios = [
        ratio("simulated K=8 steps per second / fp32's", rates[p], rates["fp32"], precision=p)
        for p in precisions
        if p != "fp32"
    ]
    for r in ratios:
        print(f"{r['precision']}: {r['median']:.2f} x the fp32 steps per second ({ratio_line(r)})")
    found["command"] = ["python", "benchmarks/gpu_smoke.py", *(argv if argv is not None else sys.argv[1:])]
    found["machine"] = machine_at_end()
    found["ratios"] = ratios
    found["tables"] = [
        {
            "title": "The runs",
            "columns": ["run", "steps", "training s", "steps/s", "final metric", "images/s"],
            "rows": [
                [
                    r["name"],
                    r["steps"],
                    f"{r['train_seconds']:.2f}",
                    f"{r['steps_per_second'] or 0:.1f}",
                    next(
                        (
                            f"{k} {v:.4f}"
                            for k, v in r.items()
                            if k not in RUN_FIELDS and isinstance(v, float)
                        ),
                        "",
                    ),
                    f"{r['images_per_second']:.0f}" if "images_per_second" in r else "",
                ]
                for r in rows
            ],
            "note": f"{found['device']}, {gpus} GPU(s), NCCL {found['nccl']}, CUDA {found['cuda']}.",
        }
    ]
    out = args.out if args.out is not None else (None if args.cpu else RESULTS / "gpu_smoke.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(found, indent=2) + "\n")
        print(f"written: {out}")
    return 0


RUN_FIELDS = {
    "name",
    "status",
    "steps",
    "train_seconds",
    "steps_per_second",
    "images_per_second",
    "seconds_with_setup",
}


if __name__ == "__main__":
    sys.exit(main())
