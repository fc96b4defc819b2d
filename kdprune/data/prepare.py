"""A built-in dataset -> the prepared dict (uint8 tensors, labels, classes, statistics) of
``data/prepared/dataset.pt``, and loading it back."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from kdprune import io
from kdprune.data.cifar import _read_cifar
from kdprune.data.idx import _read_idx
from kdprune.data.limits import DatasetError
from kdprune.data.registry import REGISTRY, locate_raw
from kdprune.data.svhn import _read_svhn


_READERS = {"idx": _read_idx, "cifar": _read_cifar, "svhn": _read_svhn}


def _stratified_subset(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``n`` samples with classes as balanced as the data allows, in a seeded order."""
    if n <= 0 or n >= len(labels):
        return torch.arange(len(labels))
    perm = torch.randperm(len(labels), generator=generator)
    classes = labels.unique()
    per_class = [perm[labels[perm] == c] for c in classes]
    # round-robin over classes keeps the subset balanced
    picked = []
    i = 0
    while len(picked) < n:
        for idx in per_class:
            if i < len(idx) and len(picked) < n:
                picked.append(int(idx[i]))
        i += 1
    return torch.tensor(sorted(picked))


def channel_stats(x: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images (N, C, H, W), in [0, 1] units.

    Exact: from a per-channel histogram of the 256 pixel values (integer counts over chunks of
    images), with one rounding at the end, to float32, the precision the values had when they came
    from a float32 reduction. Needs no float copy of the split, which for SVHN with extra would be 7 GB."""
    hist = torch.zeros(x.shape[1], 256, dtype=torch.int64)
    for i in range(0, len(x), chunk):
        add_histogram(hist, x[i:i + chunk])
    return histogram_stats(hist)


def add_histogram(hist: torch.Tensor, x: torch.Tensor) -> None:
    """``hist`` (C, 256) int64 += the per-channel counts of the pixel values of uint8 images ``x`` (n, C, H, W)."""
    for c in range(x.shape[1]):
        hist[c] += torch.bincount(x[:, c].reshape(-1), minlength=256)


def histogram_stats(hist: torch.Tensor) -> tuple[list[float], list[float]]:
    """``channel_stats`` from the per-channel histogram (C, 256) of the images' pixel values."""
    mean, std = [], []
    for counts in hist.tolist():
        n = sum(counts)
        s = sum(k * v for v, k in enumerate(counts))  # Python ints: no overflow, no rounding
        ss = sum(k * v * v for v, k in enumerate(counts))
        mean.append(s / (n * 255) if n else float("nan"))  # int / int is correctly rounded
        std.append(((n * ss - s * s) / (n * (n - 1) * 255 ** 2)) ** 0.5 if n > 1 else 0.0)
    return _as_float32(mean), _as_float32(std)


def _as_float32(values: list[float]) -> list[float]:
    return torch.tensor(values, dtype=torch.float64).float().tolist()


def prepare_dataset(name: str, root: str | None, download: bool, train_subset: int, test_subset: int,
                    seed: int, svhn_extra: bool = False) -> dict:
    """Raw files of dataset ``name`` -> the prepared dict: uint8 ``train_x``/``test_x`` (N, C, H, W), int64
    labels, class names, the hflip flag and the normalisation ``mean``/``std``.

    Normalisation uses the statistics of the prepared train split (after ``train_subset``), computed
    exactly from train only, not the registry's published values: the model sees inputs standardised
    on the data it is trained on, subsets included, and the test split never feeds anything but the
    final accuracy."""
    if name not in REGISTRY:
        raise DatasetError(f"data.name = {name!r}: unknown dataset; known: {sorted(REGISTRY)}")
    info = REGISTRY[name]
    if svhn_extra and info.format != "svhn":
        raise DatasetError(f"data.svhn_extra = true applies to data.name = svhn only, not {name!r}")
    files = locate_raw(name, root, download, svhn_extra=svhn_extra)
    raw = _READERS[info.format](info, files, svhn_extra)
    out: dict = {"name": name, "classes": raw.get("classes", list(info.classes)), "hflip": info.hflip, "source": {}}
    g = torch.Generator().manual_seed(seed)
    where = {}
    for split, subset in (("train", train_subset), ("test", test_subset)):
        images, labels, source = raw[split]
        where[split] = f"{', '.join(str(p) for p in files.values() if p.name in source.split('+'))} " \
                       f"({split} split{f', data.{split}_subset = {subset}' if subset else ''})"
        if images.shape[1:] != (info.channels, *info.image_size):
            raise DatasetError(f"{source}: '{name}' images are {(info.channels, *info.image_size)} (C, H, W), "
                               f"these are {tuple(images.shape[1:])}")
        x = torch.from_numpy(images if images.flags.writeable else images.copy())
        y = torch.from_numpy(labels)
        idx = _stratified_subset(y, subset, g)
        out[f"{split}_x"], out[f"{split}_y"] = x[idx].contiguous(), y[idx].contiguous()
        out["source"][split] = source
        if not len(idx):  # an empty train split divides by zero in its statistics; an empty test split scores 0
            raise DatasetError(f"{where[split]}: holds no images; '{name}' needs at least one train and one test image")
    out["mean"], out["std"] = channel_stats(out["train_x"])
    for c, (m, s) in enumerate(zip(out["mean"], out["std"])):
        if not (math.isfinite(m) and math.isfinite(s) and s > 0):
            raise DatasetError(
                f"{where['train']}: channel {c} has mean {m} and std {s}: "
                f"{'every pixel has the same value, so normalising divides by zero' if s == 0 else 'not finite'} "
                f"(training would diverge to NaN); the files are corrupted or not '{name}' images")
    return out


def load_prepared(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        d = io.torch_load(path)
    except io.CheckpointError as e:
        raise DatasetError(f"{e} (run `dvc repro prepare` to rebuild it)") from None
    for key in ("train_x", "train_y", "test_x", "test_y", "mean", "std", "classes"):
        if key not in d:
            raise DatasetError(f"{path}: prepared dataset lacks '{key}'; rebuild it with `dvc repro prepare`")
    return d
