"""One image file -> uint8 (C, image_size, image_size), with PIL and numpy only (no torch, no torchvision): the
decoding that training (``kdprune.data.decode``, in DataLoader workers too) and ``python -m kdprune predict``
(an exported ONNX model, on a machine that may have no torch) share, so that the two can never drift apart.

The steps are the calls torchvision's ``Resize(resize_size)`` + ``CenterCrop(image_size)`` + ``pil_to_tensor``
make on a PIL image (and torchvision's weights' ``transforms()``), written out: the shorter side resized to
``resize_size`` with ``PIL.Image.resize`` (bilinear or bicubic; PIL always antialiases), the longer one to
``int(resize_size * long / short)``, then the centre crop at ``int(round((h - image_size) / 2.0))``
(zero-padded first where the image is smaller than the crop). ``tests/test_imaging.py`` checks the bytes against
torchvision's.

16-bit grayscale (PIL modes ``I;16*``) is scaled to 8 bits by keeping the high byte (``v >> 8``), as PIL itself
reads 16-bit RGB PNGs and as ``torchvision.io.decode_image`` + ``ToDtype(torch.uint8, scale=True)`` does;
PIL's ``convert("L")`` (and a plain ``ImageFolder``'s ``convert("RGB")``) would clip every value above 255.

Every refusal is one line naming the file, raised as ``error`` (``ImageError`` unless the caller names its own,
as ``kdprune.data.decode`` names ``DatasetError``): not a regular file (a FIFO, a device), too large, a header
that declares too many pixels (a decompression bomb) or too extreme an aspect ratio, changed since it was
indexed, 32-bit or float pixels beyond 0..255, unreadable, corrupt or truncated."""
from __future__ import annotations

import io as _stdio
import os
import warnings

import numpy as np

from kdprune.errors import UserError
from kdprune.io import open_regular

MAX_IMAGE_PIXELS = 89_478_485  # width * height; PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)


MAX_FILE_BYTES = 1 << 30  # one image file; PIL's bomb limit at 8 bytes a pixel is under 1 GiB


MAX_ASPECT = 20
"""The longest side of an image is at most this many times its shortest. ``Resize`` scales the shorter side to
``data.resize_size``, so the resized image has ``resize_size**2 * aspect`` pixels whatever its file's size (a 2 KB
PNG of 2,000,000 x 1 pixels took 3.6 GB at image_size 16). At 20:1 that is at most 2048**2 * 20 = 84M pixels at
the largest resize_size (2 x 1024), within PIL's decompression-bomb limit (MAX_IMAGE_PIXELS); and the centre crop
keeps 1/20 of such an image, too little to be a picture of its class. (A larger resize_size, which only an ONNX
model's metadata can ask for, is bounded by ``MAX_IMAGE_PIXELS`` on the resized image itself.)"""

SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})  # PIL's 16-bit grayscale modes
WIDE = frozenset({"I", "F"})  # 32-bit integer and float pixels: convert("L") clips them to 0..255
INTERPOLATIONS = ("bilinear", "bicubic")  # = kdprune.params DataParams.interpolation; PIL's BILINEAR, BICUBIC


class ImageError(UserError):
    """An image file that cannot be read (one line naming it)."""


def show_path(path: str | os.PathLike) -> str:
    """A path on one line (a file name may hold a newline or a terminal escape: both are shown escaped)."""
    return repr(str(path))[1:-1]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _check_size(fh, path: str, expected_size: int | None, error: type[Exception]) -> None:
    size = os.fstat(fh.fileno()).st_size
    if size > MAX_FILE_BYTES:
        raise error(f"{show_path(path)}: larger than {MAX_FILE_BYTES >> 20} MiB; not an image kdprune reads")
    if expected_size is not None and size != expected_size:
        raise error(f"{show_path(path)}: the file changed since `dvc repro prepare` indexed it ({expected_size} "
                    f"bytes then, {size} now); rerun prepare")


def _pil_open(src, path: str, error: type[Exception]):
    """PIL's lazy open (the header only), with the declared size checked against the bomb limit."""
    from PIL import Image  # heavy optional: imported where an image is opened (DataLoader workers too)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
    except Image.DecompressionBombError:
        raise error(f"{show_path(path)}: its header declares more than {2 * MAX_IMAGE_PIXELS:,} pixels, over "
                    f"the limit of {MAX_IMAGE_PIXELS:,} (a decompression bomb or a huge image)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises UnidentifiedImageError, SyntaxError, OSError, ValueError...
        raise error(f"{show_path(path)}: not a readable image ({_first_line(e)})") from None
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
        raise error(f"{show_path(path)}: its header declares {w} x {h} = {w * h:,} pixels; kdprune decodes at "
                    f"most {MAX_IMAGE_PIXELS:,} (PIL's decompression-bomb limit)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise error(f"{show_path(path)}: {w} x {h} pixels, an aspect ratio of {max(w, h) / min(w, h):,.1f}:1; "
                    f"kdprune reads images of aspect ratio at most {MAX_ASPECT}:1 (resizing the shorter side "
                    f"makes the image {MAX_ASPECT}x as wide, or tall, as data.resize_size and more): crop it or "
                    f"remove it")
    return img


def _open_file(path: str, error: type[Exception]):
    """The file, opened only if it is a regular file: a FIFO put in an image's place would block the reader forever
    (a DataLoader worker: the run would hang), a device such as /dev/zero never ends."""
    return open_regular(path, "the image", None, error, missing="cannot read the image (No such file or directory)")


def header(path: str, expected_size: int | None = None, error: type[Exception] = ImageError) -> tuple[str, int, int]:
    """(PIL mode, width, height) from the header: only the first bytes of the file are read."""
    try:
        fh, _ = _open_file(path, error)
        with fh:
            _check_size(fh, path, expected_size, error)
            img = _pil_open(fh, path, error)
            return img.mode, img.size[0], img.size[1]
    except OSError as e:
        raise error(f"{show_path(path)}: cannot read the image ({e.strerror or e})") from None


def open_image(path: str, expected_size: int | None = None, error: type[Exception] = ImageError):
    """PIL image of ``path``, read whole into memory (header parsed and checked, pixels not yet decoded)."""
    try:
        fh, _ = _open_file(path, error)
        with fh:
            _check_size(fh, path, expected_size, error)
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise error(f"{show_path(path)}: cannot read the image ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES or (expected_size is not None and len(data) != expected_size):
        raise error(f"{show_path(path)}: the file changed while it was read; rerun prepare")
    return _pil_open(_stdio.BytesIO(data), path, error)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size``: torchvision's ``_compute_resized_output_size``
    for an int size and no max_size (the longer side truncated, not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` (H, W, C) centre-cropped to (size, size, C) as torchvision's ``center_crop`` does: zero-padded first
    (left/top get the smaller half) where the image is smaller than the crop, then cut at
    ``int(round((h - size) / 2.0))``."""
    h, w = a.shape[:2]
    if size > h or size > w:
        top, left = (size - h) // 2 if size > h else 0, (size - w) // 2 if size > w else 0
        bottom, right = (size - h + 1) // 2 if size > h else 0, (size - w + 1) // 2 if size > w else 0
        a = np.pad(a, ((top, bottom), (left, right), (0, 0)))
        h, w = a.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return a[top:top + size, left:left + size]


def preprocess(img, path: str, channels: int, resize_size: int, image_size: int, interpolation: str = "bilinear",
               error: type[Exception] = ImageError) -> np.ndarray:
    """uint8 (C, image_size, image_size), C-contiguous and writable, of an opened PIL image: 8 bits, L or RGB, the shorter side
    resized to ``resize_size`` (antialiased), the centre crop (see the module's docstring)."""
    from PIL import Image  # heavy optional: imported where an image is decoded (DataLoader workers too)

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: must be one of {', '.join(INTERPOLATIONS)}")
    resample = Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC
    try:
        img = _eight_bit(img, path, error)
        img = img.convert("L" if channels == 1 else "RGB")  # decodes
        w, h = resized_size(img.size[0], img.size[1], resize_size)
        if w * h > MAX_IMAGE_PIXELS:  # only a resize_size above 2 x 1024 (an ONNX model's) can get here
            raise error(f"{show_path(path)}: {img.size[0]} x {img.size[1]} pixels resized to {w} x {h} = {w * h:,} "
                        f"pixels, more than {MAX_IMAGE_PIXELS:,}: crop it to a smaller aspect ratio")
        if (w, h) != img.size:
            img = img.resize((w, h), resample)
        a = np.asarray(img)
        a = _centre_crop(a[:, :, None] if a.ndim == 2 else a, image_size)
        return np.array(a.transpose(2, 0, 1), order="C")  # a copy: writable, owning its memory (torch.from_numpy)
    except error:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or damaged file fails while decoding, in many ways
        raise error(f"{show_path(path)}: cannot decode the image ({_first_line(e)}); the file is corrupt "
                    f"or truncated") from None


def load(path: str, channels: int, resize_size: int, image_size: int, interpolation: str = "bilinear",
         expected_size: int | None = None, error: type[Exception] = ImageError) -> np.ndarray:
    """uint8 (C, image_size, image_size) of the image file ``path``: ``open_image`` then ``preprocess``."""
    return preprocess(open_image(path, expected_size, error), path, channels, resize_size, image_size,
                      interpolation, error)


def _eight_bit(img, path: str, error: type[Exception]):
    """16-bit grayscale -> 8-bit "L" by its high byte (``v >> 8``, see the module's docstring); 32-bit integer or
    float pixels are kept when they lie in 0..255 (what ``convert`` keeps), else refused: they have no fixed range
    to scale from, and clipping them would silently wash the image out."""
    if img.mode in SIXTEEN_BIT:
        from PIL import Image  # heavy optional: imported where an image is decoded

        return Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))  # decodes
    if img.mode in WIDE:
        lo, hi = img.getextrema()  # decodes
        if not (0 <= lo and hi <= 255):
            raise error(f"{show_path(path)}: PIL mode {img.mode} pixels span {lo:g}..{hi:g}; kdprune reads "
                        f"such 32-bit images only when they lie in 0..255 (converting them to 8 bits would "
                        f"clip the rest): save it as an 8- or 16-bit image")
    return img
