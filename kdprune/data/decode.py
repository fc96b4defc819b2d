"""Opening and decoding one image file for training, as PIL and torchvision's transforms do it; these run in
DataLoader workers too. The work is ``kdprune.imaging``'s (PIL + numpy, shared with ``python -m kdprune predict``,
so that training and an exported model's preprocessing can never drift apart); here its refusals are
``DatasetError`` lines naming the file: not a regular file (a FIFO, a device), too large, a header that declares
too many pixels (a decompression bomb) or too extreme an aspect ratio, changed since it was indexed, 32-bit or
float pixels beyond 0..255, unreadable or corrupt.

16-bit grayscale (PIL modes ``I;16*``) is scaled to 8 bits by keeping the high byte (``v >> 8``), as PIL itself
reads 16-bit RGB PNGs and as ``torchvision.io.decode_image`` + ``ToDtype(torch.uint8, scale=True)`` does;
PIL's ``convert("L")`` (and a plain ``ImageFolder``'s ``convert("RGB")``) would clip every value above 255."""
from __future__ import annotations

import torch

from kdprune import imaging
from kdprune.data.limits import DatasetError
from kdprune.imaging import MAX_ASPECT, MAX_FILE_BYTES, MAX_IMAGE_PIXELS, SIXTEEN_BIT, WIDE, show_path

__all__ = ["MAX_ASPECT", "MAX_FILE_BYTES", "MAX_IMAGE_PIXELS", "SIXTEEN_BIT", "WIDE", "decode", "header",
           "show_path"]


def header(path: str, expected_size: int | None = None) -> tuple[str, int, int]:
    """(PIL mode, width, height) from the header: only the first bytes of the file are read."""
    return imaging.header(path, expected_size, DatasetError)


def decode(path: str, channels: int, resize_size: int, image_size: int, interpolation: str = "bilinear",
           expected_size: int | None = None) -> torch.Tensor:
    """uint8 (C, image_size, image_size): converted to L or RGB, shorter side resized to ``resize_size``
    (``interpolation``, antialiased), centre crop. The same calls as torchvision's ``Resize`` + ``CenterCrop``
    on a PIL image (and as torchvision's weights' ``transforms()``): ``kdprune.imaging.load``."""
    return torch.from_numpy(imaging.load(path, channels, resize_size, image_size, interpolation, expected_size,
                                         DatasetError))
