"""Datasets: raw on-disk formats -> uint8 tensors, and a tensor-resident batch loader.

``prepare`` converts a dataset once into ``data/prepared/<name>.pt``: uint8 images (N, C, H, W),
int64 labels and metadata. Training never touches a per-sample Dataset/DataLoader: the whole
split stays in memory as one tensor, and augmentation (random crop via padding + gather,
random horizontal flip where it is label-preserving) is done per batch with tensor ops.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kdprune import io

class DatasetError(RuntimeError):
    """The dataset is missing, unreadable or not in the expected format."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    channels: int
    hflip: bool  # is a horizontal flip label-preserving? (not for digits)
    debian_package: str | None
    debian_dir: str | None
    files: dict[str, str]  # split/kind -> raw file name


REGISTRY: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        channels=1,
        hflip=True,
        debian_package="dataset-fashion-mnist",
        debian_dir="/usr/share/datasets/fashion-mnist",
        files={
            "train_images": "train-images-idx3-ubyte",
            "train_labels": "train-labels-idx1-ubyte",
            "test_images": "t10k-images-idx3-ubyte",
            "test_labels": "t10k-labels-idx1-ubyte",
        },
    ),
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read ({e}); the file is corrupted or truncated") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            f"{path}: IDX payload is {len(data) - header} bytes but the header declares shape {shape} "
            f"({expected} bytes); the file is truncated or corrupted")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` in IDX format (gzip if the name ends in .gz). Used to make test fixtures."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    code = codes[array.dtype.newbyteorder("=")]
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(_IDX_DTYPES[code]).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(payload)


def _find_idx(root: Path, info: DatasetInfo) -> dict[str, Path] | None:
    """Locate the four IDX files under ``root`` in the flat (Debian) or torchvision layout."""
    tv_dir = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}.get(info.name, info.name)
    for d in (root, root / tv_dir / "raw"):
        found = {}
        for key, base in info.files.items():
            for cand in (d / base, d / f"{base}.gz"):
                if cand.exists():
                    found[key] = cand
                    break
        if len(found) == len(info.files):
            return found
    return None


def locate_raw(name: str, root: str | None, download: bool, download_dir: Path = Path("data/raw")) -> dict[str, Path]:
    """Search order: ``data.root``, the Debian package's directory, then torchvision's downloader."""
    info = REGISTRY[name]
    if root:  # an explicit data.root is authoritative: never fall back silently to another copy
        root_path = Path(root)
        if not root_path.is_dir():
            raise DatasetError(f"data.root = {root!r}: directory not found")
        found = _find_idx(root_path, info)
        if found:
            return found
        tv_dir = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}.get(info.name, info.name)
        present = sorted(p.name for p in root_path.iterdir())
        raise DatasetError(
            f"data.root = {root!r} is not a '{name}' dataset directory: expected the IDX files "
            f"{sorted(info.files.values())} (optionally .gz) in it or in {tv_dir}/raw/ under it, but it holds "
            f"{present[:8]}{' ...' if len(present) > 8 else ''}")
    tried = []
    candidates = []
    if info.debian_dir:
        candidates.append(Path(info.debian_dir))
    candidates.append(download_dir)
    for cand in candidates:
        tried.append(str(cand))
        if cand.is_dir():
            found = _find_idx(cand, info)
            if found:
                return found
    if download:
        try:
            _torchvision_download(name, download_dir)
        except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP errors all end the same way
            tried.append(f"download to {download_dir} (failed: {type(e).__name__}: {str(e)[:200]})")
        else:
            found = _find_idx(download_dir, info)
            if found:
                return found
    hint = ""
    if info.debian_package:
        hint = f" Offline, install it with: sudo apt-get update && sudo apt-get install -y {info.debian_package}"
    raise DatasetError(
        f"dataset '{name}' not found. Looked in: {tried}. Expected the files {sorted(info.files.values())} "
        f"(optionally .gz).{hint} Or set data.root to a directory holding them.")


def _torchvision_download(name: str, download_dir: Path) -> None:
    import torchvision

    cls = {"fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    for train in (True, False):
        cls(str(download_dir), train=train, download=True)


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


def prepare_dataset(name: str, root: str | None, download: bool, train_subset: int, test_subset: int,
                    seed: int) -> dict:
    info = REGISTRY[name]
    files = locate_raw(name, root, download)
    out: dict = {"name": name, "classes": list(info.classes), "hflip": info.hflip, "source": {}}
    g = torch.Generator().manual_seed(seed)
    for split, subset in (("train", train_subset), ("test", test_subset)):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{files[f'{split}_images']}: expected images (N, H, W) and labels (N,), got "
                f"{images.shape} and {labels.shape}")
        if images.dtype != np.uint8 or labels.max(initial=0) >= len(info.classes):
            raise DatasetError(f"{files[f'{split}_labels']}: labels outside [0, {len(info.classes)})")
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W) uint8
        y = torch.from_numpy(labels.astype(np.int64))
        idx = _stratified_subset(y, subset, g)
        out[f"{split}_x"], out[f"{split}_y"] = x[idx].contiguous(), y[idx].contiguous()
        # the file name, not its path: the same bytes read from another directory give the same output hash
        out["source"][split] = files[f"{split}_images"].name
    xf = out["train_x"].float() / 255.0
    out["mean"] = xf.mean(dim=(0, 2, 3)).tolist()
    out["std"] = xf.std(dim=(0, 2, 3)).tolist()
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


class TensorLoader:
    """Batches from a uint8 tensor split held in memory, augmented on the fly with tensor ops.

    Yields normalised float batches ``(x, y)``. With ``train=True`` each epoch reshuffles,
    random-crops (pad ``crop_padding`` then crop back, via one gather) and flips where the
    dataset allows it.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std, batch_size: int, train: bool,
                 crop_padding: int = 0, hflip: bool = False, seed: int = 0, device="cpu",
                 channels_last: bool = False):
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.train = train
        self.pad = crop_padding if train else 0
        self.hflip = hflip and train
        self.device = torch.device(device)
        self.channels_last = channels_last
        c = x.shape[1]
        self.mean = torch.tensor(mean, device=device).view(1, c, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, c, 1, 1) * 255.0)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        if self.pad:
            self.x_padded = torch.nn.functional.pad(self.x, (self.pad,) * 4)
            h, w = x.shape[-2:]
            wp = w + 2 * self.pad
            rows = torch.arange(h, device=device).view(h, 1) * wp
            cols = torch.arange(w, device=device).view(1, w)
            self._base_index = (rows + cols).view(1, 1, h * w)  # flat index of the top-left crop
            self._wp = wp

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def _augment(self, idx: torch.Tensor) -> torch.Tensor:
        n = len(idx)
        c, h, w = self.x.shape[1:]
        if self.pad:
            dy = torch.randint(0, 2 * self.pad + 1, (n,), device=self.device, generator=self.generator)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), device=self.device, generator=self.generator)
            offset = (dy * self._wp + dx).view(n, 1, 1)
            src = self.x_padded[idx].view(n, c, -1)
            batch = torch.gather(src, 2, (self._base_index + offset).expand(n, c, h * w)).view(n, c, h, w)
        else:
            batch = self.x[idx]
        if self.hflip:
            flip = torch.rand(n, device=self.device, generator=self.generator) < 0.5
            batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(-1), batch)
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, device=self.device, generator=self.generator) if self.train else None
        for start in range(0, n, self.batch_size):
            if order is not None:
                idx = order[start:start + self.batch_size]
                xb, yb = self._augment(idx), self.y[idx]
            else:
                xb, yb = self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            xb = (xb.float() - self.mean) * self.inv_std
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb
