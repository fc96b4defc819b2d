"""The streaming data path: image-folder batches decoded in DataLoader workers, for sets larger than RAM.

``StreamLoader`` has the interface of ``kdprune.data.TensorLoader`` that training and evaluation use: ``len()``,
iteration over normalised float batches ``(x, y)`` on the device, ``batch_size``, ``pad``, ``hflip`` and the
seeded ``generator`` (the resume checkpoint saves and restores its state). It draws the batch order and the
augmentation in the main process, from that generator, in exactly the order ``TensorLoader`` draws them
(``randperm``, then per batch the crop offsets and the flips); the workers only decode, pad-crop and flip as
told. So, from the same images and seed, it yields the very batches ``TensorLoader`` yields: the eval batches
and, on the CPU (where ``TensorLoader``'s generator lives on the CPU too), the train batches as well.

Memory stays bounded whatever the size of the set: the file list is a numpy blob shared by the forked workers,
and at most ``2 * workers`` batches are in flight (DataLoader's ``prefetch_factor``). Batches come through
pinned memory on CUDA; workers persist across epochs. The order of the results does not depend on the number
of workers (no randomness is drawn in them).

Under DDP (``rank``, ``world``) every rank draws the same global batches and decodes only its slice of each,
as ``kdprune.train.distributed.ShardedLoader`` does for the tensor path.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch

from kdprune.data.limits import DatasetError
from kdprune.data.workers import FileIndex, batches_for, checked, worker_loader


class _EpochSpecs:
    """The DataLoader's sampler: the batch specs of the current epoch, set before each iteration."""

    def __init__(self):
        self.specs: list = []

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


class StreamLoader:
    """Batches of one split of a streamed image folder (see the module docstring)."""

    def __init__(self, files: FileIndex, preprocessing: dict, y: torch.Tensor, mean, std, batch_size: int,
                 train: bool, crop_padding: int = 0, hflip: bool = False, seed: int = 0, device="cpu",
                 channels_last: bool = False, num_workers: int | None = None, rank: int = 0, world: int = 1):
        if len(files) != len(y):
            raise DatasetError(f"the prepared index lists {len(files)} files but {len(y)} labels; rebuild it with "
                               f"`dvc repro prepare`")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"StreamLoader: rank {rank} is not in [0, {world})")
        self.files = files
        self.device = torch.device(device)
        self.y_cpu = y.cpu()
        self.y = y.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.pad = crop_padding if train else 0
        self.hflip = hflip and train
        self.channels_last = channels_last
        self.rank, self.world = rank, world
        c = preprocessing["channels"]
        self.mean = torch.tensor(mean, device=self.device).view(1, c, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, c, 1, 1) * 255.0)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: the workers take CPU indices
        digest = hashlib.sha256(repr(sorted(preprocessing.items())).encode())
        for a in (files.blob, files.offsets, files.sizes):
            digest.update(a.tobytes())
        self.index_digest = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)  # resume fingerprint
        self._sampler = _EpochSpecs()
        self._loader = worker_loader(batches_for(files, preprocessing, self.pad), self._sampler, num_workers,
                                     pin_memory=self.device.type == "cuda", persistent=True)

    def __len__(self) -> int:
        return (len(self.y_cpu) + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.y_cpu)

    def _epoch(self) -> list[tuple]:
        """This epoch's batches as (indices, dy, dx, flip), drawn as ``TensorLoader`` draws them; this rank's
        slice of each (the last batch padded to a multiple of ``world`` with its first images)."""
        n = len(self.y_cpu)
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.specs = self._epoch()
        for (idx, _, _, _), xb in zip(self._sampler.specs, self._loader):
            xb = checked(xb).to(self.device, non_blocking=True)
            yb = self.y[idx.to(self.device)]
            xb = (xb.float() - self.mean) * self.inv_std
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb


def split_files(data: dict, split: str) -> FileIndex:
    """The files of ``split`` ("train" | "test") of a prepared dict on the stream path."""
    index = data.get("index")
    if data.get("loader") != "stream" or not isinstance(index, dict) or split not in index:
        raise DatasetError("the prepared dataset has no file index (it is not on the stream path); rebuild it with "
                           "`dvc repro prepare`")
    return FileIndex.from_dict(index["root"], index[split])
