"""Many image files at once, in DataLoader workers: the shared file index, the header and decoding datasets the
workers run, and the loader that runs them (kdprune/data/imagefolder.py and decoded.py use these)."""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from kdprune.data.decode import decode, header
from kdprune.data.limits import DatasetError


HEADER_BATCH = 256  # files per header-reading task
DECODE_BATCH = 64  # files per decoding task


class FileIndex:
    """Files as one byte blob + offsets (numpy): forked DataLoader workers share it without copying, which a
    list of a million Python strings would not allow (reference counts touch every page)."""

    def __init__(self, root: str, blob: np.ndarray, offsets: np.ndarray, sizes: np.ndarray):
        self.root, self.blob, self.offsets, self.sizes = root, blob, offsets, sizes

    @classmethod
    def pack(cls, root: str, files: list[str], sizes: np.ndarray) -> FileIndex:
        encoded = [f.encode("utf-8", "surrogateescape") for f in files]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(root, blob, offsets, np.asarray(sizes, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def path(self, i: int) -> str:
        rel = self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")
        return os.path.join(self.root, rel)

    def to_dict(self) -> dict:
        return {"blob": torch.from_numpy(self.blob), "offsets": torch.from_numpy(self.offsets),
                "sizes": torch.from_numpy(self.sizes)}

    @classmethod
    def from_dict(cls, root: str, d: dict) -> FileIndex:
        return cls(root, d["blob"].numpy(), d["offsets"].numpy(), d["sizes"].numpy())


class Headers(torch.utils.data.Dataset):
    """Item ``i`` = the headers of files ``[i * HEADER_BATCH, (i + 1) * HEADER_BATCH)``: (modes, pixels) or an
    error message (a string: a worker's exception would reach the main process as a multi-line traceback)."""

    def __init__(self, files: FileIndex):
        self.files = files

    def __len__(self) -> int:
        return (len(self.files) + HEADER_BATCH - 1) // HEADER_BATCH

    def __getitem__(self, i: int):
        modes = []
        try:
            for j in range(i * HEADER_BATCH, min((i + 1) * HEADER_BATCH, len(self.files))):
                mode, _, _ = header(self.files.path(j), int(self.files.sizes[j]))
                modes.append(mode)
        except DatasetError as e:
            return str(e)
        return modes


class Batches(torch.utils.data.Dataset):
    """Item = the images of the files at ``indices`` (an int64 tensor), decoded as ``kdprune.data.decode`` does:
    uint8 (n, C, S, S), or an error message."""

    def __init__(self, files: FileIndex, channels: int, resize_size: int, image_size: int,
                 interpolation: str = "bilinear"):
        self.files, self.channels, self.resize_size, self.image_size = files, channels, resize_size, image_size
        self.interpolation = interpolation

    def __getitem__(self, indices: torch.Tensor):
        s = self.image_size
        out = torch.empty((len(indices), self.channels, s, s), dtype=torch.uint8)
        try:
            for k, i in enumerate(indices.tolist()):
                out[k] = decode(self.files.path(i), self.channels, self.resize_size, s, self.interpolation,
                                int(self.files.sizes[i]))
        except DatasetError as e:
            return str(e)
        return out


def batches_for(files: FileIndex, preprocessing: dict) -> Batches:
    """``Batches`` that decode ``files`` as the prepared dict's ``preprocessing`` says."""
    p = preprocessing
    return Batches(files, p["channels"], p["resize_size"], p["image_size"], p["interpolation"])


def decoded_chunks(batches: Batches, indices: torch.Tensor, num_workers: int | None,
                   chunk: int = DECODE_BATCH) -> Iterator[torch.Tensor]:
    """The images of the files at ``indices``, in that order, decoded by ``batches`` in DataLoader workers, as
    uint8 tensors of at most ``chunk`` images (a worker's error is raised here as one line)."""
    specs = [indices[s:s + chunk] for s in range(0, len(indices), chunk)]
    for x in worker_loader(batches, specs, num_workers):
        yield checked(x)


def _worker_init(_):
    torch.set_num_threads(1)  # a worker decodes one image at a time; torch threads would only contend


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def worker_loader(dataset, sampler, num_workers: int | None) -> torch.utils.data.DataLoader:
    """A DataLoader whose every item is already a batch (``batch_size=None``), in the sampler's order."""
    n = default_workers() if num_workers is None else num_workers
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=n,
                                       worker_init_fn=_worker_init if n > 0 else None,
                                       prefetch_factor=2 if n > 0 else None)


def checked(item):
    """A worker's result, or its error raised here, in the main process, as one line."""
    if isinstance(item, str):
        raise DatasetError(item)
    return item
