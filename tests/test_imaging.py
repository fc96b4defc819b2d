"""kdprune.imaging (PIL + numpy, no torch) decodes an image file to the same bytes as torchvision's transforms on a
PIL image (``Resize`` + ``CenterCrop`` + ``pil_to_tensor``, what kdprune.data.decode called before it shared the
code), and as ``decode()``: odd sizes, RGB, L, 16-bit, RGBA and palette files, PNG and JPEG, both interpolations,
a resize below the crop (zero padding); its refusals are decode's, word for word."""
import re

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from kdprune import imaging
from kdprune.data import DatasetError, decode

SIZES = [(37, 23), (23, 37), (5, 3), (101, 7), (40, 41)]


def write(path, mode: str, w: int, h: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        assert img.mode in imaging.SIXTEEN_BIT
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
    else:
        bands = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        a = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        img = Image.fromarray(a[:, :, 0] if bands == 1 else a, mode)
    img.save(path)
    return path


def torchvision_reference(path, channels, resize_size, image_size, interpolation) -> np.ndarray:
    """kdprune.data.decode's own steps before kdprune.imaging: torchvision's PIL path."""
    img = Image.open(path)
    if img.mode in imaging.SIXTEEN_BIT:
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    img = TF.resize(img, resize_size, interpolation=InterpolationMode(interpolation))
    img = TF.center_crop(img, image_size)
    return TF.pil_to_tensor(img).numpy()


@pytest.mark.parametrize("mode,ext", [("RGB", "png"), ("L", "png"), ("I;16", "png"), ("RGBA", "png"), ("P", "png"),
                                      ("RGB", "jpg"), ("L", "jpg")])
def test_imaging_gives_torchvisions_bytes_and_decodes(tmp_path, mode, ext):
    n = 0
    for k, (w, h) in enumerate(SIZES):
        path = str(write(tmp_path / f"{k}.{ext}", mode, w, h, seed=k))
        for channels in (1, 3):
            for interpolation in ("bilinear", "bicubic"):
                for resize_size, image_size in ((8, 8), (12, 11), (16, 9), (30, 16), (8, 11)):  # last: padded
                    got = imaging.load(path, channels, resize_size, image_size, interpolation)
                    assert got.dtype == np.uint8 and got.shape == (channels, image_size, image_size)
                    assert got.flags.c_contiguous and got.flags.writeable
                    want = torchvision_reference(path, channels, resize_size, image_size, interpolation)
                    assert np.array_equal(got, want), (path, channels, interpolation, resize_size, image_size)
                    assert np.array_equal(decode.decode(path, channels, resize_size, image_size, interpolation).numpy(),
                                          got)
                    n += 1
    assert n == len(SIZES) * 2 * 2 * 5


def test_the_two_interpolations_differ_so_the_check_above_can_tell_them_apart(tmp_path):
    path = str(write(tmp_path / "a.png", "RGB", 37, 23))
    assert not np.array_equal(imaging.load(path, 3, 16, 16, "bilinear"), imaging.load(path, 3, 16, 16, "bicubic"))


def test_imaging_refuses_as_decode_does_word_for_word(tmp_path):
    Image.new("L", (100, 1)).save(tmp_path / "thin.png")
    (tmp_path / "text.png").write_text("not an image")
    cases = [str(tmp_path / "thin.png"), str(tmp_path / "text.png"), str(tmp_path / "missing.png"), str(tmp_path)]
    for path in cases:
        with pytest.raises(imaging.ImageError) as mine:
            imaging.load(path, 3, 8, 8)
        with pytest.raises(DatasetError) as theirs:
            decode.decode(path, 3, 8, 8)
        same = [re.sub(r" at 0x[0-9a-f]+", "", str(e.value)) for e in (mine, theirs)]  # PIL names a BytesIO object
        assert same[0] == same[1] and "\n" not in same[0]
        assert imaging.show_path(path) in str(mine.value)


def test_a_resize_past_the_pixel_bound_is_refused_in_one_line(tmp_path):
    """Only an ONNX model's metadata can ask for a resize_size this large (params stop at 2 x 1024)."""
    Image.new("RGB", (20, 1)).save(tmp_path / "wide.png")
    with pytest.raises(imaging.ImageError, match=r"wide\.png: 20 x 1 pixels resized to 81920 x 4096 = "):
        imaging.load(str(tmp_path / "wide.png"), 3, 4096, 4096)
