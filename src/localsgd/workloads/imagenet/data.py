"""ImageNet-format folders: finding the images and their labels, decoding and transforming
them, and the optional pre-resized cache.

Layout: ``train/<wnid>/*.JPEG`` and either ``val/<wnid>/*.JPEG`` or a flat ``val/`` of
images with a label file of ``FILENAME WNID`` lines (space or comma separated; a file name
may omit its extension, as in the ``LOC_val_solution.csv`` form whose header line is
skipped). Class ``c`` is the ``c``-th training wnid in sorted order.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from localsgd.util.checks import ConfigError
from localsgd.workloads.base import derive_seed

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
_CROP_TAG = 0x494E  # the per-image augmentation stream, apart from base's streams


@dataclass(frozen=True)
class Split:
    """One split's image files and their class indices, in a fixed order."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: Path, key: str) -> dict[str, list[Path]]:
    """``{wnid: sorted images}`` of a per-class folder; ``ConfigError`` for a class
    folder without images."""
    out = {}
    # Hidden folders (.ipynb_checkpoints, a sync tool's) are no classes.
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _images(sub)
        if not files:
            raise ConfigError(f"{key}: class folder '{sub}' holds no images (*.JPEG, *.jpg, *.png)")
        out[sub.name] = files
    return out


def scan(data_path: str, val_labels: str | None) -> tuple[list[str], Split, Split]:
    """(wnids, train split, val split) of an ImageNet-format folder; a one-line
    ``ConfigError`` naming ``workload.data_path`` or ``workload.val_labels`` for a missing
    folder, no classes, an empty class folder, class sets that differ or a bad label line."""
    root = Path(data_path)
    train_dir, val_dir = root / "train", root / "val"
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise ConfigError(
                f"workload.data_path '{data_path}' has no {folder.name}/ folder; expected "
                "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (or a flat val/ with workload.val_labels)"
            )
    train = _class_folders(train_dir, "workload.data_path")
    if not train:
        raise ConfigError(f"workload.data_path: '{train_dir}' holds no class folders train/<wnid>/")
    wnids = sorted(train)
    index = {w: c for c, w in enumerate(wnids)}
    train_split = Split(
        tuple(p for w in wnids for p in train[w]), tuple(index[w] for w in wnids for _ in train[w])
    )
    if val_labels is not None:
        return wnids, train_split, _flat_val(val_dir, val_labels, index)
    val = _class_folders(val_dir, "workload.data_path")
    if not val:
        raise ConfigError(
            f"workload.data_path: '{val_dir}' holds no class folders; for a flat val/ of images "
            "give workload.val_labels (a file of 'FILENAME WNID' lines)"
        )
    if sorted(val) != wnids:
        only_train, only_val = sorted(set(wnids) - set(val)), sorted(set(val) - set(wnids))
        raise ConfigError(
            f"workload.data_path: train/ and val/ class folders differ (only in train: "
            f"{only_train[:3]}, only in val: {only_val[:3]}; {len(only_train)}/{len(only_val)} in all)"
        )
    return (
        wnids,
        train_split,
        Split(tuple(p for w in wnids for p in val[w]), tuple(index[w] for w in wnids for _ in val[w])),
    )


def read_labels(val_labels: str, index: dict[str, int]) -> dict[str, int]:
    """``{file name or stem: class}`` from a label file; ``ConfigError`` naming the line."""
    path = Path(val_labels)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"workload.val_labels '{val_labels}' is not a readable text file ({exc})") from None
    out: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if not fields or (number == 1 and fields[0] == "ImageId"):
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise ConfigError(
                f"workload.val_labels: line {number} of '{val_labels}' is not 'FILENAME WNID' with a "
                f"wnid of train/: {line.strip()[:80]!r}"
            )
        out[fields[0]] = index[fields[1]]
    return out


def _flat_val(val_dir: Path, val_labels: str, index: dict[str, int]) -> Split:
    labels = read_labels(val_labels, index)
    files = _images(val_dir)
    if not files:
        raise ConfigError(f"workload.data_path: '{val_dir}' holds no images for the flat form")
    missing = [f.name for f in files if f.name not in labels and f.stem not in labels]
    if missing:
        raise ConfigError(
            f"workload.val_labels '{val_labels}' has no label for {len(missing)} image(s) of "
            f"'{val_dir}', e.g. {missing[0]}"
        )
    return Split(tuple(files), tuple(labels.get(f.name, labels.get(f.stem, -1)) for f in files))


def fingerprint(splits: Sequence[Split], cache_size: int) -> str:
    """A key of the file lists (names, sizes, labels) and the cache's size: a changed
    folder gets a new cache."""
    digest = hashlib.sha256(f"cache_size={cache_size}\n".encode())
    for split in splits:
        for path, label in zip(split.paths, split.labels):
            digest.update(f"{path.parent.name}/{path.name} {path.stat().st_size} {label}\n".encode())
        digest.update(b"--\n")
    return digest.hexdigest()[:20]


# -- decoding and transforms ---------------------------------------------------------------


def decode(path: Path, shorter_side: int | None = None) -> Image.Image:
    """An RGB image; with ``shorter_side``, resized (bilinear, whole image) so that its
    shorter side is that many pixels. A JPEG is then decoded at the smallest of libjpeg's
    1/2, 1/4, 1/8 scales that keeps the shorter side at least that long (several times
    faster than a full decode, what building the cache mostly costs)."""
    with Image.open(path) as file:
        if shorter_side is not None:
            w, h = file.size
            scale = shorter_side / min(w, h)
            file.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        img = file.convert("RGB")
    return img if shorter_side is None else resize_shorter(img, shorter_side)


def resize_shorter(img: Image.Image, side: int) -> Image.Image:
    w, h = img.size
    scale = side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if size == img.size else img.resize(size, Image.Resampling.BILINEAR)


def crop_box(width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A random crop (left, top, right, bottom) of area share in :data:`SCALE` and aspect
    ratio in :data:`RATIO` (log-uniform), ten tries, else the centre crop of the clamped
    ratio (Szegedy et al. 2015's "Inception" crop)."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(u[2] * (width - w + 1)), int(u[3] * (height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def train_view(img: Image.Image, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop to ``size`` x ``size`` and a random horizontal flip."""
    box = crop_box(*img.size, generator)
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if float(torch.rand((), generator=generator)) < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(out)


def eval_view(img: Image.Image, size: int, resize: int) -> torch.Tensor:
    """The shorter side resized to ``resize``, then the centre ``size`` x ``size`` crop (done
    as one resampling of the matching box of the original)."""
    w, h = img.size
    scale = resize / min(w, h)
    side_w, side_h = min(w, size / scale), min(h, size / scale)
    left, top = (w - side_w) / 2, (h - side_h) / 2
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side_w, top + side_h))
    return to_tensor(out)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 standardized with ImageNet's per-channel mean and std."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def image_generator(seed: int, epoch: int, rank: int, index: int) -> torch.Generator:
    """The augmentation stream of one image of one rank's epoch: the same in any loader
    worker, so a run's batches do not depend on how many workers decode them."""
    return torch.Generator().manual_seed(derive_seed(_CROP_TAG, seed, epoch, rank, index))


# -- sources: JPEG files or the cache --------------------------------------------------------


class JpegSource:
    """Images decoded from their files (optionally resized to a shorter side first)."""

    def __init__(self, split: Split, shorter_side: int | None = None) -> None:
        self.split = split
        self.shorter_side = shorter_side

    def __len__(self) -> int:
        return len(self.split)

    def image(self, i: int) -> Image.Image:
        return decode(self.split.paths[i], self.shorter_side)


class CacheSource:
    """Images read from a cache file, memory-mapped (opened lazily in each process, so
    loader workers share the page cache instead of pickling arrays)."""

    def __init__(self, data_file: Path, offsets: np.ndarray, shapes: np.ndarray) -> None:
        self.data_file = data_file
        self.offsets = offsets
        self.shapes = shapes
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}

    def image(self, i: int) -> Image.Image:
        if self._data is None:
            self._data = np.memmap(self.data_file, dtype=np.uint8, mode="r")
        h, w = (int(v) for v in self.shapes[i])
        start = int(self.offsets[i])
        return Image.fromarray(np.asarray(self._data[start : start + h * w * 3]).reshape(h, w, 3), "RGB")


Source = JpegSource | CacheSource


def build_cache(folder: Path, name: str, split: Split, cache_size: int) -> None:
    """Write ``name.u8`` (the images, shorter side ``cache_size``, HWC uint8, back to back)
    and ``name.npz`` (offsets, shapes, labels) under ``folder``, each to a temporary name
    first and renamed, so a reader never sees a partial file and concurrent writers (the
    ranks of one run) do not clash; the index is renamed last."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    data_tmp, index_tmp = folder / f"{name}.u8{tag}", folder / f"{name}{tag}.npz"
    offsets = np.zeros(len(split), dtype=np.int64)
    shapes = np.zeros((len(split), 2), dtype=np.int32)
    position = 0
    with open(data_tmp, "wb") as f:
        for i, path in enumerate(split.paths):
            pixels = np.asarray(decode(path, cache_size), dtype=np.uint8)
            offsets[i], shapes[i] = position, pixels.shape[:2]
            f.write(pixels.tobytes())
            position += pixels.size
    np.savez(index_tmp, offsets=offsets, shapes=shapes, labels=np.asarray(split.labels, dtype=np.int64))
    os.replace(data_tmp, folder / f"{name}.u8")
    os.replace(index_tmp, folder / f"{name}.npz")


def cached(cache: str, splits: dict[str, Split], cache_size: int) -> dict[str, CacheSource]:
    """The cache sources of ``splits`` under ``cache/<fingerprint>/``, built on first use."""
    folder = Path(cache) / f"imagenet-{fingerprint(list(splits.values()), cache_size)}"
    out = {}
    for name, split in splits.items():
        if not (folder / f"{name}.npz").is_file():
            try:
                build_cache(folder, name, split, cache_size)
            except OSError as exc:
                raise ConfigError(
                    f"workload.cache: cannot write the cache under '{folder}' ({exc})"
                ) from None
        with np.load(folder / f"{name}.npz") as index:
            if not np.array_equal(index["labels"], np.asarray(split.labels)):
                raise ConfigError(f"workload.cache: '{folder / name}.npz' does not match the data folder")
            out[name] = CacheSource(folder / f"{name}.u8", index["offsets"], index["shapes"])
    return out
