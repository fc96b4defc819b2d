"""Many image files at once, in DataLoader workers: the shared file index, the header and batch datasets the
workers run, and the loader that runs them (kdprune/data/imagefolder.py and streaming.py use these)."""
from __future__ import annotations

import os

import numpy as np
import torch

from kdprune.data.decode import decode, header
from kdprune.data.limits import DatasetError


HEADER_BATCH = 256  # files per header-reading task


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

    def subset(self, indices: torch.Tensor) -> FileIndex:
        """The files at ``indices`` (in that order), with their sizes."""
        rel = [self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")
               for i in indices.tolist()]
        return FileIndex.pack(self.root, rel, self.sizes[indices.numpy()])

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
    """Item = one batch, given as ``(indices, dy, dx, flip)`` (``dy``/``dx``/``flip`` None or one per image): the
    decoded uint8 images (n, C, S, S), each padded by ``pad`` and cropped at (dy, dx), then flipped where asked
    (``kdprune.data.TensorLoader``'s augmentation on the stored image) - or an error message."""

    def __init__(self, files: FileIndex, channels: int, resize_size: int, image_size: int,
                 interpolation: str = "bilinear", pad: int = 0):
        self.files, self.channels, self.resize_size, self.image_size = files, channels, resize_size, image_size
        self.interpolation, self.pad = interpolation, pad

    def __getitem__(self, spec):
        indices, dy, dx, flip = spec
        s = self.image_size
        out = torch.empty((len(indices), self.channels, s, s), dtype=torch.uint8)
        try:
            for k, i in enumerate(indices.tolist()):
                img = decode(self.files.path(i), self.channels, self.resize_size, s, self.interpolation,
                             int(self.files.sizes[i]))
                if dy is not None:
                    img = torch.nn.functional.pad(img, (self.pad,) * 4)
                    y0, x0 = int(dy[k]), int(dx[k])
                    img = img[:, y0:y0 + s, x0:x0 + s]
                if flip is not None and bool(flip[k]):
                    img = img.flip(-1)
                out[k] = img
        except DatasetError as e:
            return str(e)
        return out


def batches_for(files: FileIndex, preprocessing: dict, pad: int = 0) -> Batches:
    """``Batches`` that decode ``files`` as the prepared dict's ``preprocessing`` says."""
    p = preprocessing
    return Batches(files, p["channels"], p["resize_size"], p["image_size"], p["interpolation"], pad)


def _worker_init(_):
    torch.set_num_threads(1)  # a worker decodes one image at a time; torch threads would only contend


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def worker_loader(dataset, sampler, num_workers: int | None, *, pin_memory: bool = False,
                  persistent: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose every item is already a batch (``batch_size=None``), in the sampler's order."""
    n = default_workers() if num_workers is None else num_workers
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=n,
                                       pin_memory=pin_memory, persistent_workers=persistent and n > 0,
                                       worker_init_fn=_worker_init if n > 0 else None,
                                       prefetch_factor=2 if n > 0 else None)


def checked(item):
    """A worker's result, or its error raised here, in the main process, as one line."""
    if isinstance(item, str):
        raise DatasetError(item)
    return item
