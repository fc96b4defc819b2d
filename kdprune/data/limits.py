"""What a data file may declare: the memory budget, the size checks run before anything is allocated, and
the one error type of the data path (``DatasetError``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class DatasetError(RuntimeError):
    """The dataset is missing, unreadable or not in the expected format."""


MEMORY_BUDGET = 2 * 1024 ** 3
"""The most bytes one raw array may declare: an IDX payload, a CIFAR pickle file, an SVHN .mat variable.

A few bytes of header can declare terabytes (an IDX shape, a .mat variable's dimensions, a gzip or
zlib bomb), so each declared size is checked against this before anything is allocated. The
largest real array is SVHN's extra_32x32.mat 'X' (531,131 x 3,072 bytes = 1.63 GB); 2 GiB admits it
and every other published file, and refuses what this pipeline could not hold anyway (the whole
prepared split lives in memory). Checked at call time, so tests can lower it."""

_DEFLATE_MAX_RATIO = 1032  # zlib/gzip: deflate expands at most 1032:1 (zlib.net/zlib_tech.html)
_CHUNK = 1 << 20  # incremental reads and decompression: 1 MiB at a time


def _check_declared(path: Path, what: str, nbytes: int, limit: int | None = None, why: str = "") -> None:
    """Refuse a declared size (Python ints) over the memory budget, or over ``limit`` (``why`` says what that is)."""
    if nbytes > MEMORY_BUDGET:
        raise DatasetError(f"{path}: {what} declares {nbytes:,} bytes, over the memory budget of {MEMORY_BUDGET:,} "
                           f"bytes (kdprune.data.MEMORY_BUDGET); the file is corrupted or hostile")
    if limit is not None and nbytes > limit:
        raise DatasetError(f"{path}: {what} declares {nbytes:,} bytes, more than {why} ({limit:,} bytes); the file "
                           f"is corrupted or hostile")


def _check_count(path: Path, n: int, limit: int) -> None:
    """Refuse a file that declares more images than the published one holds (the format's known limit)."""
    if n > limit:
        raise DatasetError(f"{path}: declares {n:,} images; the published file holds {limit:,}, so this one is "
                           f"corrupted or hostile")


def _check_labels(labels: np.ndarray, n_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"{path}: labels outside [0, {n_classes}): found {int(labels.min())}..{int(labels.max())}")
