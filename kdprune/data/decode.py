"""Opening and decoding one image file, as PIL and torchvision's transforms do it; these run in DataLoader
workers too. Every refusal is one ``DatasetError`` line naming the file: too large, a header that declares
too many pixels (a decompression bomb), changed since it was indexed, unreadable or corrupt."""
from __future__ import annotations

import io as _stdio
import os
import warnings

import torch

from kdprune.data.limits import DatasetError


MAX_IMAGE_PIXELS = 89_478_485  # width * height; PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)


MAX_FILE_BYTES = 1 << 30  # one image file; PIL's bomb limit at 8 bytes a pixel is under 1 GiB


def show_path(path: str | os.PathLike) -> str:
    """A path on one line (a file name may hold a newline)."""
    return repr(str(path))[1:-1]


def _check_size(fh, path: str, expected_size: int | None) -> None:
    size = os.fstat(fh.fileno()).st_size
    if size > MAX_FILE_BYTES:
        raise DatasetError(f"{show_path(path)}: larger than {MAX_FILE_BYTES >> 20} MiB; not an image kdprune reads")
    if expected_size is not None and size != expected_size:
        raise DatasetError(f"{show_path(path)}: the file changed since `dvc repro prepare` indexed it ({expected_size} "
                           f"bytes then, {size} now); rerun prepare")


def _pil_open(src, path: str):
    """PIL's lazy open (the header only), with the declared size checked against the bomb limit."""
    from PIL import Image  # heavy optional: imported where an image is opened (DataLoader workers too)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
    except Image.DecompressionBombError:
        raise DatasetError(f"{show_path(path)}: its header declares more than {2 * MAX_IMAGE_PIXELS:,} pixels, over "
                           f"the limit of {MAX_IMAGE_PIXELS:,} (a decompression bomb or a huge image)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises UnidentifiedImageError, SyntaxError, OSError, ValueError...
        raise DatasetError(f"{show_path(path)}: not a readable image ({_first_line(e)})") from None
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
        raise DatasetError(f"{show_path(path)}: its header declares {w} x {h} = {w * h:,} pixels; kdprune decodes at "
                           f"most {MAX_IMAGE_PIXELS:,} (PIL's decompression-bomb limit)")
    return img


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def header(path: str, expected_size: int | None = None) -> tuple[str, int, int]:
    """(PIL mode, width, height) from the header: only the first bytes of the file are read."""
    try:
        with open(path, "rb") as fh:
            _check_size(fh, path, expected_size)
            img = _pil_open(fh, path)
            return img.mode, img.size[0], img.size[1]
    except OSError as e:
        raise DatasetError(f"{show_path(path)}: cannot read the image ({e.strerror or e})") from None


def _open(path: str, expected_size: int | None = None):
    """PIL image of ``path``, read whole into memory (header parsed, pixels not yet decoded)."""
    try:
        with open(path, "rb") as fh:
            _check_size(fh, path, expected_size)
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise DatasetError(f"{show_path(path)}: cannot read the image ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES or (expected_size is not None and len(data) != expected_size):
        raise DatasetError(f"{show_path(path)}: the file changed while it was read; rerun prepare")
    return _pil_open(_stdio.BytesIO(data), path)


def decode(path: str, channels: int, resize_size: int, image_size: int, interpolation: str = "bilinear",
           expected_size: int | None = None) -> torch.Tensor:
    """uint8 (C, image_size, image_size): converted to L or RGB, shorter side resized to ``resize_size``
    (``interpolation``, antialiased), centre crop. The same calls as torchvision's ``Resize`` + ``CenterCrop``
    on a PIL image (and as torchvision's weights' ``transforms()``)."""
    import torchvision.transforms.functional as TF  # heavy: imported where an image is decoded
    from torchvision.transforms import InterpolationMode  # heavy: as above

    img = _open(path, expected_size)
    try:
        img = img.convert("L" if channels == 1 else "RGB")  # decodes
        img = TF.resize(img, resize_size, interpolation=InterpolationMode(interpolation))
        img = TF.center_crop(img, image_size)
        return TF.pil_to_tensor(img)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or damaged file fails while decoding, in many ways
        raise DatasetError(f"{show_path(path)}: cannot decode the image ({_first_line(e)}); the file is corrupt "
                           f"or truncated") from None
