"""How fast one CPU core feeds an ImageNet ResNet: images per second per core for the
training and evaluation transforms of ``localsgd.workloads.imagenet``, from full JPEG files
and from the pre-resized memory-mapped cache, and the cores one GPU then needs.

It writes ``--images`` JPEG files of 500x375 pixels (ImageNet's most common size; smooth
colour fields plus noise, quality 90, about the size of ImageNet's files) into a temporary
folder, then times, on one thread of one process (so the figure is per core):

- ``jpeg_train``: decode + random resized crop to 224 + flip + uint8 tensor (what a loader
  worker does per training image without the cache);
- ``jpeg_eval``: decode + resize to 256 + centre crop 224;
- ``cache<S>_train`` / ``cache<S>_eval``: the same transforms on the cache's images of
  shorter side ``S`` (read memory-mapped; the page cache is warm after the first pass);
- ``cache<S>_build``: writing the cache, per image (paid once).

Each figure is the best of ``--repeats`` passes over all images (the machine is shared).
The cores one GPU needs = ``--images-per-second`` / the per-core rate; the default 2500
images/s is an assumption (about a ResNet-50's training throughput on one A100/H100 at
bf16 with channels-last), not a measurement of this program.

    python benchmarks/imagenet_pipeline.py     # writes benchmarks/results/imagenet_pipeline.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from localsgd.workloads.imagenet import data

RESULTS = Path(__file__).resolve().parent / "results" / "imagenet_pipeline.json"
WIDTH, HEIGHT = 500, 375
IMAGE_SIZE, EVAL_RESIZE = 224, 256


def write_images(folder: Path, count: int) -> data.Split:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        freq = rng.uniform(0.005, 0.05, 3)
        smooth = np.stack([np.sin(freq[c] * (xx + 0.7 * yy) + phase[c]) for c in range(3)], -1)
        pixels = np.clip(128 + 90 * smooth + rng.normal(0, 12, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.JPEG"
        Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=90)
        paths.append(path)
    return data.Split(tuple(paths), tuple(0 for _ in paths))


def rate(fn: Callable[[int], Any], count: int, repeats: int) -> float:
    """Images per second of ``fn`` over ``count`` images, best of ``repeats`` passes."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return count / best


def transforms(source: data.Source) -> dict[str, Callable[[int], Any]]:
    generator = torch.Generator().manual_seed(0)
    return {
        "train": lambda i: data.train_view(source.image(i), IMAGE_SIZE, generator),
        "eval": lambda i: data.eval_view(source.image(i), IMAGE_SIZE, EVAL_RESIZE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-sizes", type=int, nargs="+", default=[160, 256])
    parser.add_argument("--images-per-second", type=float, default=2500.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        split = write_images(Path(tmp) / "jpeg", args.images)
        mean_kb = sum(p.stat().st_size for p in split.paths) / len(split) / 1024
        jpeg = data.JpegSource(split)
        rates["jpeg_decode"] = rate(jpeg.image, len(split), args.repeats)
        for kind, fn in transforms(jpeg).items():
            rates[f"jpeg_{kind}"] = rate(fn, len(split), args.repeats)
        for size in args.cache_sizes:
            folder = Path(tmp) / f"cache{size}"
            start = time.perf_counter()
            data.build_cache(folder, "train", split, size)
            rates[f"cache{size}_build"] = len(split) / (time.perf_counter() - start)
            with np.load(folder / "train.npz") as index:
                cached = data.CacheSource(folder / "train.u8", index["offsets"], index["shapes"])
            for kind, fn in transforms(cached).items():
                rates[f"cache{size}_{kind}"] = rate(fn, len(split), args.repeats)
            rates[f"cache{size}_bytes_per_image"] = (folder / "train.u8").stat().st_size / len(split)
    report(args, rates, mean_kb)


def report(args: argparse.Namespace, rates: dict[str, float], mean_kb: float) -> None:
    need = args.images_per_second
    rows = []
    for key in sorted(k for k in rates if k.endswith(("_train", "_eval"))):
        kind = key.rpartition("_")[2]
        base = rates[f"jpeg_{kind}"]
        rows.append(
            {
                "pipeline": key,
                "images_per_second_per_core": round(rates[key], 1),
                "ratio_to_jpeg": round(rates[key] / base, 2),
                "cores_per_gpu": round(need / rates[key], 1),
            }
        )
    print(
        f"{args.images} JPEGs of {WIDTH}x{HEIGHT} (mean {mean_kb:.0f} KiB), one thread, best of {args.repeats}"
    )
    print(f"assumed GPU step rate: {need:.0f} images/s (ResNet-50, one A100/H100, bf16; not measured)")
    print(f"{'pipeline':<16} {'img/s/core':>10} {'vs JPEG':>8} {'cores/GPU':>10}")
    for row in rows:
        print(
            f"{row['pipeline']:<16} {row['images_per_second_per_core']:>10.1f} "
            f"{row['ratio_to_jpeg']:>8.2f} {row['cores_per_gpu']:>10.1f}"
        )
    print(f"jpeg decode alone: {rates['jpeg_decode']:.1f} img/s/core")
    for size in args.cache_sizes:
        print(
            f"cache{size}: built at {rates[f'cache{size}_build']:.1f} img/s (once), "
            f"{rates[f'cache{size}_bytes_per_image'] / 1024:.0f} KiB per image "
            f"(x1.28M = {rates[f'cache{size}_bytes_per_image'] * 1.281e6 / 2**30:.0f} GiB for ImageNet's train split)"
        )
    out = {
        "benchmark": "imagenet_pipeline",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "setup": {
            "images": args.images,
            "size": [WIDTH, HEIGHT],
            "mean_jpeg_kib": round(mean_kb, 1),
            "repeats": args.repeats,
            "threads": 1,
            "image_size": IMAGE_SIZE,
            "eval_resize": EVAL_RESIZE,
            "assumed_gpu_images_per_second": need,
            "assumption": "ResNet-50 training on one A100/H100 at bf16; not measured here",
        },
        "rates": {k: round(v, 1) for k, v in rates.items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
