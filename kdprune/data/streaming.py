"""The streaming data path: batches of an image folder larger than RAM, read from its decoded array on disk.

``StreamLoader`` has the interface of ``kdprune.data.TensorLoader`` that training and evaluation use: ``len()``,
iteration over normalised float batches ``(x, y)`` on the device, ``batch_size``, ``pad``, ``hflip`` and the
seeded ``generator`` (the resume checkpoint saves and restores its state). Its images are those prepare decoded
once into a uint8 array per split (``kdprune.data.decoded``): no epoch decodes an image. Each batch is gathered
from the array (reads in ascending file order; one read for an eval batch), pad-cropped and flipped in numpy,
then moved to the device and normalised there, as ``TensorLoader`` does. The batch order and the augmentation
are drawn from the generator in exactly the order ``TensorLoader`` draws them (``randperm``, then per batch the
crop offsets and the flips), so, from the same images and seed, it yields the very batches ``TensorLoader``
yields: the eval batches and, on the CPU (where ``TensorLoader``'s generator lives on the CPU too), the train
batches as well.

No DataLoader workers: a gather from the page cache and a crop cost microseconds an image (decoding cost
milliseconds). One background thread reads and augments the next ``prefetch`` batches while the current one
trains (``prefetch=0``: in the calling thread); the thread draws nothing, so the batches do not depend on it.
Memory: the batches in flight, whatever the size of the set (the array's pages are the kernel's page cache).

Under DDP (``rank``, ``world``) every rank draws the same global batches and reads only its slice of each from
the same array, as ``kdprune.train.distributed.ShardedLoader`` does for the tensor path: the ranks read
disjoint images.
"""
from __future__ import annotations

import hashlib
import queue
import threading
from typing import Iterator

import numpy as np
import torch

from kdprune.data import decoded
from kdprune.data.decoded import DecodedArray
from kdprune.data.limits import DatasetError
from kdprune.data.workers import FileIndex

_END = object()


def crop_flip(x: np.ndarray, dy: np.ndarray | None, dx: np.ndarray | None, flip: np.ndarray | None,
              pad: int) -> np.ndarray:
    """``TensorLoader``'s augmentation of uint8 images ``x`` (n, C, H, W), in place where it can: each image
    zero-padded by ``pad``, cropped back at (``dy[k]``, ``dx[k]``) of the padded image, then flipped
    left-right where ``flip[k]``."""
    n, _, h, w = x.shape
    if dy is not None:
        out = np.zeros_like(x)
        for k in range(n):
            oy, ox = int(dy[k]) - pad, int(dx[k]) - pad  # the crop's top-left corner in the unpadded image
            ys, ye, xs, xe = max(0, oy), min(h, h + oy), max(0, ox), min(w, w + ox)
            if ye > ys and xe > xs:
                out[k, :, ys - oy:ye - oy, xs - ox:xe - ox] = x[k, :, ys:ye, xs:xe]
        x = out
    if flip is not None and flip.any():
        k = np.flatnonzero(flip)
        x[k] = x[k][..., ::-1]
    return x


class StreamLoader:
    """Batches of one split's decoded array (see the module docstring); ``rows``: the array rows it serves (None:
    all of them, in order), so that a loader of a subset reads the same array."""

    def __init__(self, array: DecodedArray, y: torch.Tensor, mean, std, batch_size: int, train: bool,
                 crop_padding: int = 0, hflip: bool = False, seed: int = 0, device="cpu",
                 channels_last: bool = False, rank: int = 0, world: int = 1, rows: torch.Tensor | None = None,
                 prefetch: int = 2):
        self.rows = np.arange(len(array), dtype=np.int64) if rows is None else rows.numpy().astype(np.int64)
        if len(self.rows) != len(y):
            raise DatasetError(f"{array.path}: serves {len(self.rows)} images but there are {len(y)} labels; "
                               f"rebuild it with `dvc repro prepare`")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"StreamLoader: rank {rank} is not in [0, {world})")
        self.array = array
        self.device = torch.device(device)
        self.y = y.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.pad = crop_padding if train else 0
        self.hflip = hflip and train
        self.channels_last = channels_last
        self.rank, self.world = rank, world
        self.prefetch = prefetch
        c = array.shape[1]
        self.mean = torch.tensor(mean, device=self.device).view(1, c, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, c, 1, 1) * 255.0)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU, as the reads
        digest = hashlib.sha256(repr((array.spec.key, array.spec.sha256)).encode())
        digest.update(self.rows.tobytes())
        self.index_digest = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)  # resume fingerprint

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def _epoch(self) -> list[tuple]:
        """This epoch's batches as (indices, dy, dx, flip), drawn as ``TensorLoader`` draws them; this rank's
        slice of each (the last batch padded to a multiple of ``world`` with its first images)."""
        n = len(self.rows)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        specs = []
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            b = len(idx)
            dy = dx = flip = None
            if self.pad:
                dy = torch.randint(0, 2 * self.pad + 1, (b,), generator=self.generator)
                dx = torch.randint(0, 2 * self.pad + 1, (b,), generator=self.generator)
            if self.hflip:
                flip = torch.rand(b, generator=self.generator) < 0.5
            if self.world > 1:
                fill = -b % self.world
                idx, dy, dx, flip = (None if t is None else torch.cat([t, t[:fill]]) for t in (idx, dy, dx, flip))
                share = (b + fill) // self.world
                lo = self.rank * share
                idx, dy, dx, flip = (None if t is None else t[lo:lo + share] for t in (idx, dy, dx, flip))
            specs.append((idx, dy, dx, flip))
        return specs

    def _load(self, spec: tuple) -> torch.Tensor:
        """The uint8 batch of ``spec``: read, augmented, pinned for a GPU."""
        idx, dy, dx, flip = (None if t is None else t.numpy() for t in spec)
        x = crop_flip(self.array.read(self.rows[idx]), dy, dx, flip, self.pad)
        xb = torch.from_numpy(x)
        return xb.pin_memory() if self.device.type == "cuda" else xb

    def _batches(self, specs: list[tuple]) -> Iterator[torch.Tensor]:
        """The uint8 batches of ``specs`` in order, read ``prefetch`` ahead by a background thread."""
        if self.prefetch <= 0:
            yield from (self._load(s) for s in specs)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for s in specs:
                    if not put(self._load(s)):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - raised again in the consumer's thread
                put(e)

        t = threading.Thread(target=work, name="kdprune-stream-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # also when the consumer stops early: the thread must not keep reading
            stop.set()
            t.join()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        specs = self._epoch()
        batches = self._batches(specs)
        try:
            for (idx, _, _, _), xb in zip(specs, batches):
                xb = xb.to(self.device, non_blocking=True)
                yb = self.y[idx.to(self.device)]
                xb = (xb.float() - self.mean) * self.inv_std
                if self.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                yield xb, yb
        finally:
            batches.close()  # stops the prefetch thread when the caller stops early


def split_files(data: dict, split: str) -> FileIndex:
    """The files of ``split`` ("train" | "test") of a prepared dict on the stream path."""
    index = data.get("index")
    if data.get("loader") != "stream" or not isinstance(index, dict) or split not in index \
            or split not in data.get("decoded", {}):
        raise DatasetError("the prepared dataset has no decoded array (it is not on the stream path, or it was "
                           "prepared by an older kdprune); rebuild it with `dvc repro -f prepare`")
    return FileIndex.from_dict(index["root"], index[split])


def split_array(data: dict, split: str, num_workers: int | None = None) -> DecodedArray:
    """The decoded array of ``split`` of a prepared dict on the stream path, checked against what prepare
    recorded; a missing one is decoded again (``num_workers`` processes) from the files of the index."""
    files = split_files(data, split)
    spec = decoded.Spec.from_dict(split, data["decoded"][split])
    return decoded.open_or_rebuild(spec, files, data["preprocessing"], num_workers=num_workers)
