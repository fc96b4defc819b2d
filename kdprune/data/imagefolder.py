"""Image folders (``data.name: imagefolder``): the layout check and ``prepare`` (decoding one image: decode.py;
many, in DataLoader workers: workers.py).

Layout (torchvision's ``ImageFolder``): ``data.root`` holds ``train/<class>/...`` and ``val/<class>/...``.
The classes are the sub-directory names, sorted, the same in both splits; the images are the files with
torchvision's extensions (``.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp``, any case) anywhere under a
class directory, in torchvision's order. Other files are ignored.

Decoding is PIL's, as in a plain ``ImageFolder`` script and in torchvision's weights' transforms, so the
uint8 pixels are identical to what such a script feeds its model:

- channels: 1 when every image of both splits is grayscale (PIL modes ``1 L LA I I;16 F``), converted with
  ``convert("L")``; otherwise 3, every image converted with ``convert("RGB")`` (as ``ImageFolder`` does); 16-bit
  grayscale is first scaled to 8 bits by its high byte (kdprune/data/decode.py: ``convert`` would clip it);
- eval transform ("as stored"): ``Resize(resize_size)`` (the shorter side, bilinear, antialiased) then
  ``CenterCrop(image_size)``; ``resize_size`` defaults to ``image_size``;
- train transform: the stored ``image_size`` images, padded by ``data.crop_padding`` and randomly cropped
  back, then flipped with probability 1/2 (the same ops as the built-in datasets, ``kdprune.data.TensorLoader``).

Two data paths (``data.loader``): ``tensor`` decodes every image once here and stores uint8 (N, C, H, W)
tensors in ``data/prepared/dataset.pt``, like the built-in datasets; ``stream`` decodes every image once here
too, into a uint8 array on disk per split (``kdprune.data.decoded``), and stores in ``dataset.pt`` the index (the
files, their sizes and labels) and the arrays' keys and sha256; training reads its batches from the arrays
(``kdprune.data.streaming``). ``auto`` takes ``tensor`` when the decoded train + val images fit
``data.memory_budget_mb``. On the stream path the tensors ``train_x``/``test_x`` of the prepared dict are *meta*
tensors: they carry the shape (N, C, H, W) that the stages read, and any attempt to read a pixel from them
fails loudly. Both paths compute the mean/std exactly over the whole train split.

What is refused, each with a one-line ``DatasetError`` naming the file or directory: a missing ``train/`` or
``val/``, an empty class directory, classes that differ between the splits, no images, more than
``MAX_CLASSES`` classes or ``MAX_FILES`` images, an unreadable or corrupt image, an image whose header declares
more than ``MAX_IMAGE_PIXELS`` pixels (checked before decoding: decompression bombs) or an aspect ratio over
``decode.MAX_ASPECT``:1, a file that is not a regular file, a train split with a constant channel (std 0), and symbolic
links that lead out of ``data.root``. An error about a ``data.root`` outside the repository does not list it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdprune.data.decode import show_path
from kdprune.data.limits import DatasetError
from kdprune.data import decoded
from kdprune.data.prepare import _stratified_subset, add_histogram, channel_stats, histogram_stats
from kdprune.data.preprocessing import override_stats
from kdprune.data.workers import Batches, FileIndex, Headers, batches_for, checked, decoded_chunks, worker_loader
from kdprune.io import resolves_inside

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = (("train", "train"), ("test", "val"))  # prepared-dict split -> directory under data.root
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_FILES = 20_000_000  # images over both splits; ImageNet-21k has 14.2M
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


@dataclass
class Split:
    files: list[str]  # relative to the root, '/'-separated, in torchvision's order
    labels: np.ndarray  # int64
    sizes: np.ndarray  # int64 bytes on disk, checked again when a file is decoded


@dataclass
class Folder:
    root: Path  # resolved (no symlinks)
    classes: list[str]
    splits: dict[str, Split]  # "train", "test"


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _check_link(entry: os.DirEntry, root: str) -> None:
    if entry.is_symlink() and not _inside(os.path.realpath(entry.path), root):
        raise DatasetError(f"{show_path(entry.path)}: a symbolic link out of data.root (to "
                           f"{show_path(os.path.realpath(entry.path))}); kdprune reads only files under data.root: point "
                           f"data.root at the real directory or copy the data in")


def _class_dirs(split_dir: Path, root: str) -> list[str]:
    names = []
    with os.scandir(split_dir) as it:
        for entry in it:
            if entry.is_dir():  # follows links, as torchvision's find_classes does
                _check_link(entry, root)
                names.append(entry.name)
                if len(names) > MAX_CLASSES:
                    raise DatasetError(f"{show_path(split_dir)}: more than {MAX_CLASSES:,} class directories")
    return sorted(names)


def _class_files(class_dir: Path, root: str, budget: int) -> tuple[list[str], list[int]]:
    """The image files under ``class_dir`` in torchvision's order (``sorted(os.walk(followlinks=True))``, each
    directory's files sorted), with their sizes. Links must stay under ``root``; at most ``budget`` files."""
    per_dir: list[tuple[str, list[tuple[str, int]]]] = []
    seen: set[str] = set()
    stack = [str(class_dir)]
    count = 0
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen:  # a link to a directory already walked (a loop: os.walk would never end)
            continue
        seen.add(real)
        found = []
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise DatasetError(f"{show_path(d)}: cannot list the directory ({e.strerror or e})") from None
        for entry in entries:
            _check_link(entry, root)
            if entry.is_dir():
                stack.append(entry.path)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                if not entry.is_file():  # a FIFO would block the reader forever; a dangling link has no image
                    raise DatasetError(f"{show_path(entry.path)}: not a regular file (a dangling link, a pipe or a "
                                       f"device); an image must be a file")
                try:
                    size = entry.stat().st_size
                except OSError as e:
                    raise DatasetError(f"{show_path(entry.path)}: cannot read the image ({e.strerror or e})") from None
                found.append((entry.name, size))
                count += 1
                if count > budget:
                    raise DatasetError(f"{show_path(class_dir.parent.parent)}: more than {MAX_FILES:,} images; "
                                       f"kdprune reads at most {MAX_FILES:,}")
        per_dir.append((d, sorted(found)))
    files, sizes = [], []
    for d, found in sorted(per_dir, key=lambda t: t[0]):
        for name, size in found:
            files.append(os.path.join(d, name))
            sizes.append(size)
    return files, sizes


def scan(root: str | os.PathLike) -> Folder:
    """Check the layout of ``root`` and list its images (no image is opened here)."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatasetError(f"data.root = {show_path(root)}: directory not found")
    real_root = os.path.realpath(root_path)
    dirs = {split: Path(real_root) / name for split, name in SPLITS}
    missing = [f"{name}/" for split, name in SPLITS if not dirs[split].is_dir()]
    if missing:
        if resolves_inside(real_root):
            present = sorted(show_path(p.name) for p in Path(real_root).iterdir())
            holds = f"it holds {present[:8]}{' ...' if len(present) > 8 else ''}"
        else:  # an error message must not list a directory outside the repository
            holds = "its contents are not listed: it is outside the repository"
        raise DatasetError(f"data.root = {show_path(root)}: missing {' and '.join(missing)}; an image folder holds "
                           f"train/<class>/<images> and val/<class>/<images> (torchvision's ImageFolder layout); "
                           f"{holds}")
    for split, name in SPLITS:  # real_root is resolved: a split is outside it only when it is a link out
        if not _inside(os.path.realpath(dirs[split]), real_root):
            raise DatasetError(f"{show_path(root_path / name)}: a symbolic link out of data.root (to "
                               f"{show_path(os.path.realpath(dirs[split]))}); point data.root at a directory that holds "
                               f"the real train/ and val/")
    classes = {split: _class_dirs(dirs[split], real_root) for split, _ in SPLITS}
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_val = sorted(set(classes["test"]) - set(classes["train"]))
        raise DatasetError(f"data.root = {show_path(root)}: train/ and val/ must have the same class directories; "
                           f"only in train/: {[show_path(c) for c in only_train[:5]]}"
                           f"{' ...' if len(only_train) > 5 else ''}, only in val/: "
                           f"{[show_path(c) for c in only_val[:5]]}{' ...' if len(only_val) > 5 else ''}")
    if not classes["train"]:
        raise DatasetError(f"data.root = {show_path(root)}: no class directories in train/ and val/ (expected "
                           f"train/<class>/<images>, torchvision's ImageFolder layout)")
    splits = {}
    total = 0
    for split, name in SPLITS:
        files, labels, sizes = [], [], []
        for k, cls in enumerate(classes[split]):
            found, found_sizes = _class_files(dirs[split] / cls, real_root, MAX_FILES - total)
            if not found:
                raise DatasetError(f"{show_path(dirs[split] / cls)}: empty class directory (no file with an image "
                                   f"extension {' '.join(IMG_EXTENSIONS)}); remove it or add its images")
            total += len(found)
            files += [os.path.relpath(f, real_root).replace(os.sep, "/") for f in found]
            labels += [k] * len(found)
            sizes += found_sizes
        splits[split] = Split(files, np.asarray(labels, dtype=np.int64), np.asarray(sizes, dtype=np.int64))
    return Folder(Path(real_root), classes["train"], splits)


def decoded_bytes(n_images: int, channels: int, image_size: int) -> int:
    return int(n_images) * int(channels) * int(image_size) ** 2


def choose_loader(loader: str, nbytes: int, memory_budget_mb: int) -> str:
    """``data.loader`` -> "tensor" or "stream", given the decoded size of train + val."""
    budget = int(memory_budget_mb) << 20
    if loader == "stream":
        return "stream"
    if nbytes <= budget:
        return "tensor"
    if loader == "tensor":
        raise DatasetError(f"data.loader = tensor: the decoded images need {nbytes / 2**20:,.1f} MiB, more than "
                           f"data.memory_budget_mb = {memory_budget_mb}; raise the budget, or set data.loader to "
                           f"stream (or auto) to decode them while training")
    return "stream"


def _decode_into(out: torch.Tensor, batches: Batches, indices: torch.Tensor, num_workers: int | None) -> None:
    """``out[k]`` = the image of file ``indices[k]``, decoded by ``batches`` in DataLoader workers."""
    start = 0
    for x in decoded_chunks(batches, indices, num_workers):
        out[start:start + len(x)] = x
        start += len(x)


def prepare(root: str, *, image_size: int, resize_size: int | None = None, interpolation: str = "bilinear",
            loader: str = "auto", memory_budget_mb: int = 4096, train_subset: int = 0, test_subset: int = 0,
            seed: int = 0, num_workers: int | None = None, mean: list[float] | None = None,
            std: list[float] | None = None, decoded_dir: str | os.PathLike | None = None,
            log: Callable[[str], None] | None = None) -> dict:
    """An image folder -> the prepared dict: the keys of ``kdprune.data.prepare_dataset``'s, plus ``loader``
    ("tensor" | "stream"), ``preprocessing`` (how the stored images were made), ``computed_mean``/``computed_std``
    and, on the stream path, ``index`` (the files) and ``decoded`` (each split's array in ``decoded_dir``, default
    ``kdprune.data.decoded.default_dir()``: key, shape, sha256). ``mean``/``std`` override the computed
    statistics; ``log`` hears what was decoded or reused."""
    resize_size = image_size if resize_size is None else resize_size
    if resize_size < image_size:
        raise DatasetError(f"data.resize_size = {resize_size} is smaller than data.image_size = {image_size}: the "
                           f"centre crop must fit in the resized image")
    folder = scan(root)
    g = torch.Generator().manual_seed(seed)
    chosen: dict[str, tuple[FileIndex, torch.Tensor]] = {}
    for split, subset in (("train", train_subset), ("test", test_subset)):
        s = folder.splits[split]
        idx = _stratified_subset(torch.from_numpy(s.labels), subset, g).numpy()
        chosen[split] = (FileIndex.pack(str(folder.root), [s.files[i] for i in idx], s.sizes[idx]),
                         torch.from_numpy(s.labels[idx]).contiguous())
    modes: set[str] = set()
    for split in ("train", "test"):
        for item in worker_loader(Headers(chosen[split][0]), None, num_workers):
            modes.update(checked(item))
    channels = 1 if modes <= GRAY_MODES else 3
    n = {split: len(chosen[split][0]) for split in chosen}
    path = choose_loader(loader, decoded_bytes(n["train"] + n["test"], channels, image_size), memory_budget_mb)
    out: dict = {"name": "imagefolder", "classes": list(folder.classes), "hflip": True,
                 "source": {"train": "train/", "test": "val/"}, "loader": path,
                 "preprocessing": {"resize_size": int(resize_size), "image_size": int(image_size),
                                   "interpolation": interpolation, "channels": channels}}
    shape = (channels, image_size, image_size)
    for split in ("train", "test"):
        files, labels = chosen[split]
        out[f"{split}_y"] = labels
        if path == "tensor":
            x = torch.empty((n[split], *shape), dtype=torch.uint8)
            _decode_into(x, batches_for(files, out["preprocessing"]), torch.arange(n[split]), num_workers)
            out[f"{split}_x"] = x
        else:  # the shape only: the pixels are in the decoded array on disk (kdprune.data.decoded)
            out[f"{split}_x"] = torch.empty((n[split], *shape), dtype=torch.uint8, device="meta")
    if path == "tensor":
        computed = channel_stats(out["train_x"])
    else:
        hist = torch.zeros(channels, 256, dtype=torch.int64)
        specs = decoded.prepare_arrays(
            root, {split: chosen[split][0] for split in chosen}, out["preprocessing"],
            decoded.default_dir() if decoded_dir is None else Path(decoded_dir), num_workers,
            on_chunk={"train": lambda x: add_histogram(hist, torch.from_numpy(x))}, log=log)
        computed = histogram_stats(hist)  # exact, over the whole train split, as on the tensor path
        out["index"] = {"root": str(folder.root), **{split: chosen[split][0].to_dict() for split in chosen}}
        out["decoded"] = {split: spec.to_dict() for split, spec in specs.items()}
    _check_stats(computed, root, n["train"])
    out["mean"], out["std"] = override_stats(computed, mean, std, channels)
    out["computed_mean"], out["computed_std"] = computed
    return out


def _check_stats(computed: tuple[list[float], list[float]], root: str, n_train: int) -> None:
    """Refuse a train split with a constant channel (std 0: normalising divides by zero) or non-finite statistics,
    as ``prepare_dataset`` does for the built-in datasets."""
    for c, (m, s) in enumerate(zip(*computed)):
        if not (math.isfinite(m) and math.isfinite(s) and s > 0):
            raise DatasetError(
                f"data.root = {show_path(root)}: channel {c} of its {n_train} train images has mean {m} and std {s}: "
                f"{'every pixel has the same value, so normalising divides by zero' if s == 0 else 'not finite'} "
                f"(training would diverge to NaN); are these the right images?")
