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

The variants are timed interleaved (each repetition runs every pipeline once over all
images, in an order that rotates; one warm-up repetition dropped) and repeated ``--reps``
times (>= 5); each pipeline's images per second and its ratio to the JPEG pipeline of the
same kind are reported as median and range over the repetitions.
The cores one GPU needs = ``--images-per-second`` / the per-core rate; the default 2500
images/s is an assumption (about a ResNet-50's training throughput on one A100/H100 at
bf16 with channels-last), not a measurement of this program.

    python benchmarks/imagenet_pipeline.py          # writes benchmarks/results/imagenet_pipeline.json
    python benchmarks/imagenet_pipeline.py --quick  # smoke run: 20 images, 2 repetitions
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from shared import MIN_REPS, interleaved, machine_at_end, ratio, ratio_line, write_results

from localsgd.workloads.imagenet import data

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


def one_pass(fn: Callable[[int], Any], count: int) -> Callable[[], float]:
    """One measurement: images per second of ``fn`` over ``count`` images, one pass."""

    def measure() -> float:
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        return count / (time.perf_counter() - start)

    return measure


def transforms(source: data.Source) -> dict[str, Callable[[int], Any]]:
    generator = torch.Generator().manual_seed(0)
    return {
        "train": lambda i: data.train_view(source.image(i), IMAGE_SIZE, generator),
        "eval": lambda i: data.eval_view(source.image(i), IMAGE_SIZE, EVAL_RESIZE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 images, 2 repetitions, no JSON")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--reps", type=int, default=MIN_REPS, help=f"repetitions (default {MIN_REPS})")
    parser.add_argument("--cache-sizes", type=int, nargs="+", default=[160, 256])
    parser.add_argument("--images-per-second", type=float, default=2500.0)
    args = parser.parse_args()
    if args.quick:
        args.images, args.reps = 20, 2
    elif args.reps < MIN_REPS:
        parser.error(f"--reps must be at least {MIN_REPS} (fewer only with --quick)")
    torch.set_num_threads(1)
    built: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        split = write_images(Path(tmp) / "jpeg", args.images)
        mean_kb = sum(p.stat().st_size for p in split.paths) / len(split) / 1024
        jpeg = data.JpegSource(split)
        variants = {"jpeg_decode": one_pass(jpeg.image, len(split))}
        variants |= {f"jpeg_{kind}": one_pass(fn, len(split)) for kind, fn in transforms(jpeg).items()}
        for size in args.cache_sizes:
            folder = Path(tmp) / f"cache{size}"
            start = time.perf_counter()
            data.build_cache(folder, "train", split, size)
            built[size] = {
                "images_per_second": len(split) / (time.perf_counter() - start),
                "bytes_per_image": (folder / "train.u8").stat().st_size / len(split),
            }
            with np.load(folder / "train.npz") as index:
                cached = data.CacheSource(folder / "train.u8", index["offsets"], index["shapes"])
            variants |= {
                f"cache{size}_{kind}": one_pass(fn, len(split)) for kind, fn in transforms(cached).items()
            }
        rates = interleaved(variants, args.reps, warmup=1)
    report(args, rates, built, mean_kb)


def report(
    args: argparse.Namespace,
    rates: dict[str, list[float]],
    built: dict[int, dict[str, float]],
    mean_kb: float,
) -> None:
    need = args.images_per_second
    ratios = []
    rows = []
    for key in sorted(k for k in rates if k.endswith(("_train", "_eval"))):
        kind = key.rpartition("_")[2]
        med = statistics.median(rates[key])
        row: list[Any] = [key, f"{med:.0f} [{min(rates[key]):.0f}, {max(rates[key]):.0f}]"]
        if not key.startswith("jpeg_"):
            r = ratio(
                "images/s per core / JPEG of the same kind", rates[key], rates[f"jpeg_{kind}"], pipeline=key
            )
            ratios.append(r)
            row.append(f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]")
        else:
            row.append("1 (baseline)")
        row.append(f"{need / med:.1f}")
        rows.append(row)
    decode = statistics.median(rates["jpeg_decode"])
    cache_rows = [
        [
            f"cache{size}",
            f"{b['images_per_second']:.0f}",
            f"{b['bytes_per_image'] / 1024:.0f}",
            f"{b['bytes_per_image'] * 1.281e6 / 2**30:.0f}",
        ]
        for size, b in built.items()
    ]
    setup = (
        f"{args.images} JPEGs of {WIDTH}x{HEIGHT} (mean {mean_kb:.0f} KiB), one thread, "
        f"{args.reps} interleaved repetitions after one warm-up"
    )
    tables = [
        {
            "title": "Images per second per core, and the cores one GPU needs",
            "columns": [
                "pipeline",
                "images/s per core, median [min, max]",
                "/ JPEG of the same kind",
                "cores per GPU",
            ],
            "rows": rows,
            "note": (
                f"{setup}. JPEG decoding alone: {decode:.0f} images/s per core (median). Cores per GPU "
                f"= {need:.0f} images/s / the median per-core rate; {need:.0f} images/s is an assumption "
                "(ResNet-50 training on one A100/H100 at bf16), not a measurement of this program."
            ),
        },
        {
            "title": "The pre-resized cache, built once",
            "columns": [
                "cache",
                "built at images/s",
                "KiB per image",
                "GiB for ImageNet's 1.28 M training images",
            ],
            "rows": cache_rows,
            "note": "One timing each: the cache is written once per data set.",
        },
    ]
    print(setup)
    for t in tables:
        print(f"\n{t['title']}")
        for row in t["rows"]:
            print("  " + " | ".join(str(c) for c in row))
    for r in ratios:
        print(ratio_line(r))
    out = {
        "command": ["python", "benchmarks/imagenet_pipeline.py", *sys.argv[1:]],
        "quick": args.quick,
        "setup": {
            "images": args.images,
            "size": [WIDTH, HEIGHT],
            "mean_jpeg_kib": round(mean_kb, 1),
            "reps": args.reps,
            "threads": 1,
            "image_size": IMAGE_SIZE,
            "eval_resize": EVAL_RESIZE,
            "assumed_gpu_images_per_second": need,
            "assumption": "ResNet-50 training on one A100/H100 at bf16; not measured here",
        },
        "machine": machine_at_end(),
        "rates": rates,
        "cache": {str(size): b for size, b in built.items()},
        "ratios": ratios,
        "tables": tables,
    }
    write_results("imagenet_pipeline", out, args.quick)


if __name__ == "__main__":
    main()
