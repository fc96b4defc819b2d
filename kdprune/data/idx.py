"""MNIST and Fashion-MNIST: the IDX format (gzipped or not), read with every declared size checked first."""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from kdprune.data.limits import (_CHUNK, _DEFLATE_MAX_RATIO, DatasetError, _check_count, _check_declared,
                                  _check_labels)
from kdprune.data.registry import DatasetInfo
from kdprune.io import open_regular


# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@contextlib.contextmanager
def _open_idx(path: Path, max_len: int | None = None) -> Iterator[tuple[object, tuple[int, ...], np.dtype]]:
    """Open an IDX file (gzipped if its name ends in .gz) and check its header before anything is allocated:
    yields (file positioned at the payload, shape, dtype). The declared size, in Python ints (``np.prod``
    would wrap: 65536^4 is 0 in int64), must fit ``MEMORY_BUDGET`` and the file: equal to the payload
    uncompressed, at most what deflate can expand the file to gzipped. ``max_len``: the most items (first
    dimension) it may declare. Read errors anywhere in the ``with`` body become a ``DatasetError``."""
    compressed = path.suffix == ".gz"
    try:
        raw, size = open_regular(path, "an IDX file", None, DatasetError)
        with raw, (gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw) as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise DatasetError(f"{path}: not an IDX file (bad magic number)")
            code, ndim = head[2], head[3]
            if code not in _IDX_DTYPES:
                raise DatasetError(f"{path}: unknown IDX element type 0x{code:02x}")
            dims = fh.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DatasetError(f"{path}: truncated IDX header")
            shape = struct.unpack(f">{ndim}I", dims)
            dtype = np.dtype(_IDX_DTYPES[code])
            header, nbytes = 4 + 4 * ndim, math.prod(shape) * dtype.itemsize
            if max_len is not None and ndim:
                _check_count(path, shape[0], max_len)
            if compressed:
                _check_declared(path, f"the IDX header (shape {shape})", header + nbytes, _DEFLATE_MAX_RATIO * size,
                                f"a gzip file of {size:,} bytes can expand to (deflate: at most {_DEFLATE_MAX_RATIO}:1)")
            else:
                _check_declared(path, f"the IDX header (shape {shape})", nbytes)
                if header + nbytes != size:
                    raise DatasetError(
                        f"{path}: IDX payload is {size - header} bytes but the header declares shape {shape} "
                        f"({nbytes} bytes); the file is truncated or corrupted")
            yield fh, shape, dtype
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({e}); the file is corrupted or truncated") from None


def read_idx(path: str | os.PathLike, max_len: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array of its declared shape.

    The header is checked first (``_open_idx``); the payload is then read, and decompressed,
    incrementally into an array of the declared size and never past it: a gzip bomb stops there."""
    path = Path(path)
    with _open_idx(path, max_len) as (fh, shape, dtype):
        nbytes = math.prod(shape) * dtype.itemsize
        buf = np.empty(nbytes, np.uint8)
        view, got = memoryview(buf), 0
        while got < nbytes and (n := fh.readinto(view[got:got + _CHUNK])):
            got += n
        longer = bool(fh.read(1))
    if got < nbytes or longer:
        raise DatasetError(
            f"{path}: IDX payload is {f'more than {nbytes}' if longer else got} bytes but the header declares "
            f"shape {shape} ({nbytes} bytes); the file is truncated or corrupted")
    return buf.view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


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


def _torchvision_idx_root(info: DatasetInfo, files: dict[str, Path]) -> Path | None:
    """The root torchvision's MNIST/FashionMNIST class reads ``files`` from, if it can read them at all:
    its ``<root>/<Class>/raw/`` layout, uncompressed (it checks only that those names exist)."""
    tv_raw = Path(info.torchvision_class) / "raw"
    parents = {p.parent for p in files.values()}
    if len(parents) != 1 or any(p.suffix == ".gz" for p in files.values()):
        return None
    (parent,) = parents
    return parent.parent.parent if parent.parts[-2:] == tv_raw.parts else None


def _read_idx_split(info: DatasetInfo, files: dict[str, Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    roles = (f"{split}_images", f"{split}_labels")
    tv_root = _torchvision_idx_root(info, files)
    if tv_root is not None:
        import torchvision  # heavy: torchvision is imported only where it is used

        for role in roles:  # torchvision reads whole files and checks their sizes with np.prod (which wraps)
            with _open_idx(files[role], info.max_images[role]):
                pass
        cls = getattr(torchvision.datasets, info.torchvision_class)
        try:
            ds = cls(str(tv_root), train=split == "train", download=False)
            return ds.data.numpy(), ds.targets.numpy()
        except Exception as e:  # noqa: BLE001 - torchvision asserts; read_idx below says what is wrong
            for role in roles:
                read_idx(files[role], info.max_images[role])
            raise DatasetError(f"{files[roles[0]].parent}: torchvision.datasets.{info.torchvision_class} cannot read "
                               f"the {split} files ({type(e).__name__}: {e})") from None
    images, labels = (read_idx(files[role], info.max_images[role]) for role in roles)
    return images, labels


def _read_idx(info: DatasetInfo, files: dict[str, Path], extra: bool) -> dict:
    out = {}
    for split in ("train", "test"):
        images, labels = _read_idx_split(info, files, split)
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{images_path}: expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}")
        if images.dtype != np.uint8:
            raise DatasetError(f"{images_path}: expected uint8 pixels, got {images.dtype}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"{labels_path}: expected integer labels, got {labels.dtype}")
        labels = labels.astype(np.int64)
        _check_labels(labels, len(info.classes), labels_path)
        # the file name, not its path: the same bytes read from another directory give the same output hash
        out[split] = (images[:, None], labels, images_path.name)
    return out
