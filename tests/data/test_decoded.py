"""The stream path's decoded arrays (kdprune.data.decoded): reuse, invalidation, a killed prepare, and hostile
files (truncated, forged, absurd headers, a full disk, bad images), each one line naming the file."""
import io
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdprune.data import DatasetError, TensorLoader, decoded, imagefolder, streaming
from tests.data.test_imagefolder import damage, tiny_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "decoded"
    monkeypatch.setenv(decoded.ENV_DIR, str(d))
    return d


def prepare(root: Path, **kw) -> dict:
    return imagefolder.prepare(str(root), **{"image_size": 8, "num_workers": 0, "loader": "stream", **kw})


def arrays(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.suffix == ".u8") if cache.exists() else []


def leftovers(cache: Path) -> list[Path]:
    """Everything but the lock files."""
    return sorted(p for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---- reuse and invalidation ----

def test_prepare_reuses_an_array_and_dataset_pt_stays_identical(tmp_path, cache):
    root = tiny_folder(tmp_path / "root")
    logs = []
    d1 = prepare(root, log=logs.append)
    assert [p.name.split("-")[0] for p in arrays(cache)] == ["test", "train"]
    assert sum("decoded into" in m for m in logs) == 2
    inodes = [p.stat().st_ino for p in arrays(cache)]
    logs.clear()
    d2 = prepare(root, log=logs.append)
    assert sum("reused" in m for m in logs) == 2 and [p.stat().st_ino for p in arrays(cache)] == inodes
    b1, b2 = io.BytesIO(), io.BytesIO()
    torch.save(d1, b1)
    torch.save(d2, b2)
    assert b1.getvalue() == b2.getvalue()
    os.utime(root / "train" / "a" / "0.png", ns=(1, 1))  # touched, the same pixels: rebuilt, the same sha256
    logs.clear()
    d3 = prepare(root, log=logs.append)
    assert any(m.startswith("train: decoded into") for m in logs) and any(m.startswith("test: reused") for m in logs)
    assert d3["decoded"] == d1["decoded"]


@pytest.mark.parametrize("change", ["resize_size", "image_size", "interpolation", "file_added", "file_size",
                                    "same_size_pixels"])
def test_what_invalidates_an_array(tmp_path, cache, change):
    root = tiny_folder(tmp_path / "root")
    rng = np.random.default_rng(0)
    for png in root.rglob("*.png"):  # textured: another resize or interpolation gives other pixels
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(png)
    base = prepare(root, resize_size=11)  # the images are 12 x 10: resized
    kw = {"resize_size": 11}
    if change == "resize_size":
        kw["resize_size"] = 12
    elif change == "image_size":
        kw = {"image_size": 9, "resize_size": 11}
    elif change == "interpolation":
        kw["interpolation"] = "bicubic"
    elif change == "file_added":
        Image.new("RGB", (12, 10), (9, 9, 9)).save(root / "train" / "a" / "9.png")
    elif change == "file_size":
        Image.new("RGB", (30, 20), (9, 99, 9)).save(root / "train" / "a" / "0.png")
    else:  # a BMP has a fixed size: other pixels, the same bytes count; its mtime changes
        for split in ("train", "val"):
            Image.new("RGB", (12, 10), (50, 60, 70)).save(root / split / "a" / "x.bmp")
        base = prepare(root, **kw)
        Image.new("RGB", (12, 10), (70, 60, 50)).save(root / "train" / "a" / "x.bmp")
    d = prepare(root, **kw)
    t = imagefolder.prepare(str(root), image_size=kw.get("image_size", 8), num_workers=0, loader="tensor",
                            **{k: v for k, v in kw.items() if k != "image_size"})
    assert d["decoded"]["train"]["sha256"] != base["decoded"]["train"]["sha256"]
    if change == "same_size_pixels":  # the same key, rebuilt in place (the stamp changed)
        assert d["decoded"]["train"]["key"] == base["decoded"]["train"]["key"]
    else:
        assert d["decoded"]["train"]["key"] != base["decoded"]["train"]["key"]
    got = streaming.split_array(d, "train").read(np.arange(len(t["train_y"])))
    assert torch.equal(torch.from_numpy(got), t["train_x"])  # never the stale pixels


def test_an_older_dataset_pt_is_refused_once_the_array_was_rebuilt_from_changed_images(tmp_path, cache):
    root = tiny_folder(tmp_path / "root")
    for split in ("train", "val"):
        Image.new("RGB", (12, 10), (50, 60, 70)).save(root / split / "a" / "x.bmp")
    old = prepare(root)
    Image.new("RGB", (12, 10), (70, 60, 50)).save(root / "train" / "a" / "x.bmp")
    prepare(root)  # the same key, other pixels
    with pytest.raises(DatasetError, match=r"train-[0-9a-f]{64}\.u8: its pixels' sha256 .* is not the .* that "
                                           r"prepare recorded in dataset.pt") as e:
        streaming.split_array(old, "train")
    one_line(e)


# ---- a killed prepare ----

def test_a_prepare_killed_while_writing_leaves_no_array_that_is_trusted(tmp_path, cache):
    root = tiny_folder(tmp_path / "root", n=6)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from kdprune.data import decoded, imagefolder
        real = decoded._decode
        def dying(*a, **k):
            for i, x in enumerate(real(*a, **k)):
                yield x[:1]  # one image written, then SIGKILL (the OOM killer, a lost machine)
                os.kill(os.getpid(), signal.SIGKILL)
        decoded._decode = dying
        imagefolder.prepare({str(root)!r}, image_size=8, num_workers=0, loader="stream")
    """)
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, decoded.ENV_DIR: str(cache)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not arrays(cache) and [p.suffix for p in leftovers(cache)] == [".tmp"]  # only the torn temp file
    d = prepare(root)  # the next prepare does not trust it: decodes, and removes it
    assert len(arrays(cache)) == 2 and len(leftovers(cache)) == 2
    t = imagefolder.prepare(str(root), image_size=8, num_workers=0, loader="tensor")
    assert torch.equal(torch.from_numpy(streaming.split_array(d, "train").read(np.arange(12))), t["train_x"])


@pytest.mark.parametrize("case", ["corrupt", "truncated", "bomb", "big"])
def test_a_bad_image_stops_prepare_naming_it_and_leaves_no_array(tmp_path, cache, case):
    root = tiny_folder(tmp_path / "root")  # `truncated` passes the header check and fails while decoding
    pattern = damage(case, root, tmp_path / "outside")
    with pytest.raises(DatasetError, match=pattern) as e:
        prepare(root)
    one_line(e)
    assert not leftovers(cache)


# ---- hostile array files ----

def forge(path: Path, **fields) -> None:
    raw = bytearray(path.read_bytes()[:decoded.HEADER.size])
    names = ["magic", "version", "n", "c", "h", "w", "key", "stamp", "sha"]
    values = dict(zip(names, decoded.HEADER.unpack(bytes(raw))))
    values.update(fields)
    with open(path, "r+b") as fh:
        fh.write(decoded.HEADER.pack(*(values[k] for k in names)))


HOSTILE = {
    "truncated": (lambda p: os.truncate(p, p.stat().st_size - 7), r"bytes, its header declares .*: a truncated or "
                                                                   r"padded file"),
    "padded": (lambda p: open(p, "ab").write(b"x"), r"a truncated or padded file"),
    "empty": (lambda p: os.truncate(p, 0), r"0 bytes, too short to hold a decoded array's header"),
    "foreign": (lambda p: p.write_bytes(b"\x89PNG" + bytes(5000)), r"not a kdprune decoded array"),
    "version": (lambda p: forge(p, version=99), r"format version 99, this kdprune reads version 1"),
    "absurd_shape": (lambda p: forge(p, n=1 << 60), r"declares the shape \(1,152,921,504,606,846,976, 3, 8, 8\), "
                                                    r"outside what prepare writes"),
    "absurd_side": (lambda p: forge(p, h=1 << 31, w=1 << 31), r"outside what prepare writes"),
    "other_shape": (lambda p: forge(p, n=3), r"declares the shape \(3, 3, 8, 8\), prepare recorded \(4, 3, 8, 8\)"),
    "renamed": (lambda p: forge(p, key=bytes(32)), r"its header is of key 0000000000000000\.\.\., not"),
    "fifo": (lambda p: (p.unlink(), os.mkfifo(p)), r"a FIFO \(named pipe\), not a regular file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_damaged_or_forged_array_is_one_line_naming_it_at_prepare_and_at_load(tmp_path, cache, case):
    root = tiny_folder(tmp_path / "root")
    d = prepare(root)
    path = next(p for p in arrays(cache) if p.name.startswith("test-"))
    damage_it, pattern = HOSTILE[case]
    damage_it(path)
    for attempt in (lambda: streaming.split_array(d, "test"), lambda: prepare(root)):
        with pytest.raises(DatasetError, match=re_path(path) + ": .*" + pattern) as e:
            attempt()
        assert "delete it and rerun `dvc repro prepare`" in one_line(e)


def re_path(path: Path) -> str:
    return re.escape(str(path))


def test_pixels_modified_under_an_intact_header_are_refused_by_prepare(tmp_path, cache):
    root = tiny_folder(tmp_path / "root")
    prepare(root)
    path = next(p for p in arrays(cache) if p.name.startswith("train-"))
    with open(path, "r+b") as fh:
        fh.seek(decoded.HEADER_BYTES + 5)
        fh.write(b"\xff")
    with pytest.raises(DatasetError, match=re_path(path) + r": its pixels do not match its header's sha256") as e:
        prepare(root)
    one_line(e)


def test_an_array_truncated_while_in_use_is_a_line_not_a_sigbus(tmp_path, cache):
    root = tiny_folder(tmp_path / "root")
    d = prepare(root)
    array = streaming.split_array(d, "train")
    os.truncate(array.path, decoded.HEADER_BYTES + 100)
    ld = streaming.StreamLoader(array, d["train_y"], d["mean"], d["std"], 3, train=True, crop_padding=1)
    with pytest.raises(DatasetError, match=re_path(array.path) + r": ends at byte .* truncated while in use") as e:
        list(ld)
    one_line(e)


def test_a_disk_too_small_is_refused_before_anything_is_written(tmp_path, cache, monkeypatch):
    root = tiny_folder(tmp_path / "root")
    usage = type("Usage", (), {"free": decoded.KEEP_FREE + 100})
    monkeypatch.setattr(decoded.shutil, "disk_usage", lambda _: usage)
    with pytest.raises(DatasetError, match=r"data.root = .*root: its decoded images need 0\.00 GiB in .*decoded, "
                                           r"which has 1\.00 GiB free \(kdprune leaves 1 GiB free\); free some "
                                           r"space, point \$KDPRUNE_DECODED_DIR at a larger disk") as e:
        prepare(root)
    one_line(e)
    assert not cache.exists()


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path, cache, monkeypatch):
    import errno

    root = tiny_folder(tmp_path / "root")

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(decoded.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"train-[0-9a-f]{64}\.u8: cannot write it: No space left on device") as e:
        prepare(root)
    one_line(e)
    assert not leftovers(cache)


# ---- the augmentation on numpy ----

@pytest.mark.parametrize("pad", [0, 1, 3, 9])
def test_crop_flip_is_tensorloaders_augmentation(pad):
    g = torch.Generator().manual_seed(pad)
    x = torch.randint(0, 256, (20, 3, 7, 7), dtype=torch.uint8, generator=g)
    ref = TensorLoader(x, torch.zeros(20, dtype=torch.int64), [0.5] * 3, [0.25] * 3, 20, train=True,
                       crop_padding=pad, hflip=True, seed=3)
    state = ref.generator.get_state()
    (xr, _), = list(ref)
    ref.generator.set_state(state)
    order = torch.randperm(20, generator=ref.generator)
    dy = dx = None
    if pad:
        dy = torch.randint(0, 2 * pad + 1, (20,), generator=ref.generator).numpy()
        dx = torch.randint(0, 2 * pad + 1, (20,), generator=ref.generator).numpy()
    flip = (torch.rand(20, generator=ref.generator) < 0.5).numpy()
    got = streaming.crop_flip(x[order].numpy().copy(), dy, dx, flip, pad)
    assert torch.equal((torch.from_numpy(got).float() - ref.mean) * ref.inv_std, xr)


def test_a_prefetching_loader_stopped_early_stops_its_thread(tmp_path, cache):
    import threading

    root = tiny_folder(tmp_path / "root", n=8)
    d = prepare(root)
    ld = streaming.StreamLoader(streaming.split_array(d, "train"), d["train_y"], d["mean"], d["std"], 2, train=True)
    for k, _ in enumerate(ld):
        if k == 1:
            break
    assert not [t for t in threading.enumerate() if t.name == "kdprune-stream-prefetch"]
