"""The tensor-resident batch loader: the whole split in memory, augmentation per batch with tensor ops."""
from __future__ import annotations

from typing import Iterator

import torch


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
