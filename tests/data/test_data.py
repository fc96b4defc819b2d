import dataclasses
import gzip
import math
import pickle  # tests only: to write hostile files
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib

import numpy as np
from pathlib import Path

import pytest
import torch
import yaml

from kdprune import data as kdata
from kdprune.data import DatasetError, TensorLoader, prepare_dataset, read_idx, write_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_roundtrip(tmp_path, suffix, dtype):
    arr = (np.arange(2 * 3 * 5) * 7 % 251).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / f"a-idx3-ubyte{suffix}"
    write_idx(path, arr)
    out = read_idx(path)
    assert out.shape == (2, 3, 5) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_idx_reader_parses_hand_written_header(tmp_path):
    # magic 0x00000801 (ubyte, 1 dim), 3 items: the format as documented, written by hand
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    np.testing.assert_array_equal(read_idx(path), [7, 0, 9])


def test_idx_truncated_and_bad_magic(tmp_path):
    good = np.zeros((4, 28, 28), np.uint8)
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, good)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(path)
    bad = tmp_path / "y-idx3-ubyte"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(bad)
    broken_gz = tmp_path / "z-idx3-ubyte.gz"
    broken_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6])
    with pytest.raises(DatasetError, match="corrupted or truncated"):
        read_idx(broken_gz)


def test_prepare_reads_root_and_subsets(fake_root):
    d = prepare_dataset("fashion_mnist", str(fake_root), False, 100, 0, seed=0)
    assert d["train_x"].shape == (100, 1, 28, 28) and d["train_x"].dtype == torch.uint8
    assert d["test_x"].shape == (100, 1, 28, 28)
    assert torch.bincount(d["train_y"], minlength=10).tolist() == [10] * 10  # class-balanced subset
    assert d["hflip"] is True and len(d["classes"]) == 10
    assert 0 < d["mean"][0] < 1 and 0 < d["std"][0] < 1


def test_prepare_torchvision_layout(tmp_path):
    from tests.helpers import write_fake_dataset

    write_fake_dataset(tmp_path / "FashionMNIST" / "raw", gz=False)
    d = prepare_dataset("fashion_mnist", str(tmp_path), False, 0, 0, seed=0)
    assert d["train_x"].shape[0] == 400


def test_missing_dataset_offline_says_how_to_install(tmp_path, monkeypatch):
    info = dataclasses.replace(kdata.REGISTRY["fashion_mnist"], debian_dir=str(tmp_path / "nope"))
    monkeypatch.setitem(kdata.REGISTRY, "fashion_mnist", info)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        prepare_dataset("fashion_mnist", None, False, 0, 0, seed=0)
    with pytest.raises(DatasetError, match="data.root"):
        prepare_dataset("fashion_mnist", str(tmp_path / "missing"), False, 0, 0, seed=0)


def _loader(x, pad, hflip, seed=0):
    y = torch.zeros(len(x), dtype=torch.long)
    return TensorLoader(x, y, [0.0], [1 / 255.0], batch_size=len(x), train=True, crop_padding=pad, hflip=hflip,
                        seed=seed)


def test_augmentation_is_a_crop_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randint(1, 255, (64, 1, 8, 8), dtype=torch.uint8)
    (xb, _), = list(_loader(x, pad=2, hflip=False))
    xb = xb.round().to(torch.uint8)  # mean 0, std 1/255: the loader returns the raw pixel values
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifted = 0
    for img in xb:  # each output must equal some 8x8 window of some padded input
        matches = [(i, dy, dx) for i in range(64) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 8], img)]
        assert matches, "augmented image is not a crop of any padded input"
        shifted += any((dy, dx) != (2, 2) for _, dy, dx in matches)
    assert shifted > 32  # 24 of 25 offsets are shifts


def test_flip_only_when_allowed():
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(200, 1, 1, 1)
    (noflip, _), = list(_loader(x, pad=0, hflip=False))
    assert all(torch.equal(img, x[0].float()) for img in noflip)
    (flip, _), = list(_loader(x, pad=0, hflip=True))
    n_flipped = sum(torch.equal(img, x[0].flip(-1).float()) for img in flip)
    assert 60 < n_flipped < 140


def test_eval_loader_is_ordered_and_normalised():
    x = torch.full((10, 1, 4, 4), 51, dtype=torch.uint8)
    y = torch.arange(10)
    loader = TensorLoader(x, y, [0.2], [0.1], batch_size=4, train=False)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert torch.allclose(batches[0][0], torch.zeros(4, 1, 4, 4), atol=1e-5)  # (51/255 - 0.2) / 0.1 = 0


@pytest.mark.parametrize("layout", ["cifar_pickles", "pngs", "partial_idx"])
def test_wrong_format_dataset_dir_names_the_problem(tmp_path, monkeypatch, layout):
    """An explicit data.root in the wrong format is an error naming what is expected and what is there,
    never a silent fall-back to the system copy in /usr/share/datasets."""
    monkeypatch.chdir(tmp_path)  # the repository: only a directory inside it has its contents listed
    root = tmp_path / "root"
    root.mkdir()
    if layout == "cifar_pickles":
        (root / "cifar-10-batches-py").mkdir()
        (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04junk")
    elif layout == "pngs":
        for i in range(3):
            (root / f"img{i}.png").write_bytes(b"\x89PNG\r\n")
    else:  # three of the four IDX files
        from tests.helpers import write_fake_dataset
        write_fake_dataset(root)
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as e:
        prepare_dataset("fashion_mnist", str(root), True, 0, 0, seed=0)
    msg = str(e.value)
    assert "is not a 'fashion_mnist' dataset directory" in msg and "t10k-labels-idx1-ubyte" in msg, msg
    assert {"cifar_pickles": "cifar-10-batches-py", "pngs": "img0.png", "partial_idx": "t10k-images"}[layout] in msg


@pytest.mark.parametrize("how", ["absolute", "symlink"])
def test_wrong_root_outside_the_repository_is_not_listed(tmp_path, monkeypatch, how):
    """Probe: data.root = a home directory: the 'not a dataset directory' error listed its file names."""
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / "id_rsa").write_text("secret")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data").symlink_to(outside)
    monkeypatch.chdir(repo)
    with pytest.raises(DatasetError) as e:
        prepare_dataset("mnist", str(outside) if how == "absolute" else "data", False, 0, 0, seed=0)
    assert "id_rsa" not in str(e.value) and "its contents are not listed: it is outside the repository" in str(e.value)
    assert "train-images-idx3-ubyte" in str(e.value)  # what is expected is still said


def test_right_names_wrong_content_is_refused(tmp_path):
    from tests.helpers import write_fake_dataset
    root = write_fake_dataset(tmp_path / "root", gz=False)
    (root / "train-images-idx3-ubyte").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte: not an IDX file"):
        prepare_dataset("fashion_mnist", str(root), False, 0, 0, seed=0)


# ---- the five datasets, each from tiny files in its real on-disk format ----

from tests.helpers import write_fake_cifar, write_fake_idx, write_fake_svhn  # noqa: E402


def _no_debian_dirs(monkeypatch, tmp_path):
    """Hide the system's /usr/share/datasets copies and work in tmp_path (so data/raw is empty)."""
    for name, info in kdata.REGISTRY.items():
        if info.debian_dir:
            monkeypatch.setitem(kdata.REGISTRY, name, dataclasses.replace(info, debian_dir=str(tmp_path / "nope")))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("layout", ["flat_gz", "torchvision_raw"])
def test_prepare_idx_datasets(tmp_path, name, layout):
    tv_dir = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
    raw = tmp_path / "root" / (tv_dir + "/raw" if layout == "torchvision_raw" else "")
    written = write_fake_idx(raw, n_train=60, n_test=20, gz=layout == "flat_gz")
    d = prepare_dataset(name, str(tmp_path / "root"), False, 0, 0, seed=0)
    for split in ("train", "test"):
        x, y = written[split]
        assert d[f"{split}_x"].dtype == torch.uint8 and d[f"{split}_x"].shape == (len(x), 1, 28, 28)
        assert d[f"{split}_y"].dtype == torch.int64
        assert torch.equal(d[f"{split}_x"][:, 0], torch.from_numpy(x))
        assert torch.equal(d[f"{split}_y"], torch.from_numpy(y.astype(np.int64)))
    assert d["hflip"] is (name == "fashion_mnist")  # digits are not flip-invariant
    assert d["classes"] == list(kdata.REGISTRY[name].classes) and len(d["classes"]) == 10
    assert d["classes"][0] == ("0" if name == "mnist" else "T-shirt/top")
    assert len(d["mean"]) == len(d["std"]) == 1


def test_torchvision_layout_is_read_by_torchvision_and_agrees_with_read_idx(tmp_path, monkeypatch):
    write_fake_idx(tmp_path / "flat", n_train=40, n_test=10, gz=True)
    write_fake_idx(tmp_path / "tv" / "MNIST" / "raw", n_train=40, n_test=10, gz=False)
    ours = prepare_dataset("mnist", str(tmp_path / "flat"), False, 0, 0, seed=0)

    def no_read_idx(path):
        raise AssertionError(f"read_idx({path}) called for a layout torchvision reads")
    monkeypatch.setattr(kdata.idx, "read_idx", no_read_idx)
    theirs = prepare_dataset("mnist", str(tmp_path / "tv"), False, 0, 0, seed=0)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype, k
    assert ours["mean"] == theirs["mean"] and ours["std"] == theirs["std"]


def test_torchvision_layout_with_a_broken_file_names_it(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_fake_idx(raw, n_train=40, n_test=10, gz=False)
    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte: IDX payload .* truncated"):
        prepare_dataset("mnist", str(tmp_path), False, 0, 0, seed=0)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("py2", [True, False], ids=["py2-original-style", "py3-protocol2"])
def test_prepare_cifar(tmp_path, name, py2):
    k = len(kdata.REGISTRY[name].classes)
    names = [f"Class{i}" for i in range(k)]  # not the canonical names: they must come from the meta file
    written = write_fake_cifar(tmp_path, name, n_train=100, n_test=30, py2=py2, class_names=names)
    d = prepare_dataset(name, str(tmp_path), False, 0, 0, seed=0)
    for split in ("train", "test"):
        x, y = written[split]
        assert d[f"{split}_x"].dtype == torch.uint8 and d[f"{split}_x"].shape == (len(x), 3, 32, 32)
        assert torch.equal(d[f"{split}_x"], torch.from_numpy(x))  # the 5 CIFAR-10 batches, in order
        assert torch.equal(d[f"{split}_y"], torch.from_numpy(y)) and d[f"{split}_y"].dtype == torch.int64
    assert d["classes"] == names and d["hflip"] is True
    assert len(d["mean"]) == len(d["std"]) == 3
    expected = np.asarray(written["train"][0], np.float64) / 255
    np.testing.assert_allclose(d["mean"], expected.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(d["std"], expected.std(axis=(0, 2, 3), ddof=1), rtol=1e-6)
    # the same directory found as data.root itself (pointed at cifar-*-python/) and with a train subset
    sub = prepare_dataset(name, str(written["dir"]), False, 50, 0, seed=0)
    assert sub["train_x"].shape == (50, 3, 32, 32) and sub["test_x"].shape == (30, 3, 32, 32)


def test_cifar_meta_with_the_wrong_number_of_classes_is_refused(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10, class_names=["a", "b", "c"])
    with pytest.raises(DatasetError, match=r"batches.meta: expected 'label_names', a list of 10 class names, got 3"):
        prepare_dataset("cifar10", str(tmp_path), False, 0, 0, seed=0)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_malicious_cifar_pickle_is_refused_before_it_runs(tmp_path, payload):
    import pickle

    written = write_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    marker = tmp_path / "pwned"
    evil = _Evil(marker) if payload == "os.system" else _EvalEvil(marker)
    (written["dir"] / "data_batch_3").write_bytes(pickle.dumps({b"data": evil}, protocol=2))
    with pytest.raises(DatasetError, match=r"data_batch_3: refusing to unpickle the global '(posix|os|__builtin__)\.") as e:
        prepare_dataset("cifar10", str(tmp_path), False, 0, 0, seed=0)
    assert payload.split(".")[1] in str(e.value)
    assert not marker.exists(), "the pickle's payload ran"


class _EvalEvil(_Evil):
    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


def test_pickle_codecs_call_is_limited_to_latin1(tmp_path):
    # _codecs.encode is allowed only as protocol 2 uses it for bytes: (str, 'latin1')
    written = write_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    evil = b"\x80\x02}q\x00X\x04\x00\x00\x00dataq\x01c_codecs\nencode\nq\x02X\x03\x00\x00\x00abcq\x03X\x05" \
           b"\x00\x00\x00rot13q\x04\x86q\x05Rq\x06s."
    (written["dir"] / "test_batch").write_bytes(evil)
    with pytest.raises(DatasetError, match=r"test_batch: refusing _codecs.encode\(str, 'rot13'\)"):
        prepare_dataset("cifar10", str(tmp_path), False, 0, 0, seed=0)


@pytest.mark.parametrize("damage", ["truncated", "not_a_dict", "no_labels"])
def test_damaged_cifar_batch_names_the_file(tmp_path, damage):
    import pickle

    written = write_fake_cifar(tmp_path, "cifar100", n_train=20, n_test=10)
    path = written["dir"] / "train"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "not_a_dict":
        path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    else:
        path.write_bytes(pickle.dumps({"data": written["train"][0].reshape(20, -1), "coarse_labels": [0] * 20}, 2))
    needle = {"truncated": "not a readable CIFAR python pickle", "not_a_dict": "holds a dict, this one holds a list",
              "no_labels": "needs 'data' and 'fine_labels'"}[damage]
    with pytest.raises(DatasetError, match=rf"cifar-100-python/train: .*{needle}"):
        prepare_dataset("cifar100", str(tmp_path), False, 0, 0, seed=0)


def test_prepare_svhn_maps_label_10_to_0(tmp_path):
    written = write_fake_svhn(tmp_path, n_train=60, n_test=30, n_extra=20)
    d = prepare_dataset("svhn", str(tmp_path), False, 0, 0, seed=0)
    for split in ("train", "test"):
        x, y = written[split]
        assert d[f"{split}_x"].dtype == torch.uint8 and d[f"{split}_x"].shape == (len(x), 3, 32, 32)
        assert torch.equal(d[f"{split}_x"], torch.from_numpy(x))  # (32, 32, 3, N) -> (N, 3, H, W), no mix-up
        assert torch.equal(d[f"{split}_y"], torch.from_numpy(y)) and d[f"{split}_y"].dtype == torch.int64
    assert (d["train_y"] == 0).sum() == 6  # written as 10 in the file
    assert int(d["train_y"].max()) == 9
    assert d["hflip"] is False and d["classes"] == [str(i) for i in range(10)]
    assert d["source"] == {"train": "train_32x32.mat", "test": "test_32x32.mat"}  # extra is off by default


def test_svhn_extra_is_appended_to_train(tmp_path):
    written = write_fake_svhn(tmp_path, n_train=40, n_test=20, n_extra=30)
    d = prepare_dataset("svhn", str(tmp_path), False, 0, 0, seed=0, svhn_extra=True)
    assert d["train_x"].shape == (70, 3, 32, 32) and d["test_x"].shape == (20, 3, 32, 32)
    assert torch.equal(d["train_x"], torch.from_numpy(np.concatenate([written["train"][0], written["extra"][0]])))
    assert torch.equal(d["train_y"], torch.from_numpy(np.concatenate([written["train"][1], written["extra"][1]])))
    assert d["source"]["train"] == "train_32x32.mat+extra_32x32.mat"
    (tmp_path / "extra_32x32.mat").unlink()
    with pytest.raises(DatasetError, match=r"lacks \['extra_32x32.mat'\]"):
        prepare_dataset("svhn", str(tmp_path), False, 0, 0, seed=0, svhn_extra=True)
    with pytest.raises(DatasetError, match="data.svhn_extra = true applies to data.name = svhn only"):
        prepare_dataset("cifar10", str(tmp_path), False, 0, 0, seed=0, svhn_extra=True)


@pytest.mark.parametrize("damage", ["garbage", "wrong_shape", "bad_label"])
def test_damaged_svhn_mat_names_the_file(tmp_path, damage):
    import scipy.io

    write_fake_svhn(tmp_path, n_train=10, n_test=10)
    path = tmp_path / "test_32x32.mat"
    if damage == "garbage":
        path.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(50))
    elif damage == "wrong_shape":
        scipy.io.savemat(path, {"X": np.zeros((10, 3, 32, 32), np.uint8), "y": np.ones((10, 1), np.uint8)})
    else:
        scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[3], [11]], np.uint8)})
    needle = {"garbage": "not a readable MATLAB .mat file", "wrong_shape": r"'X' must be uint8 \(32, 32, 3, N\)",
              "bad_label": r"labels outside \[0, 10\]"}[damage]
    with pytest.raises(DatasetError, match=rf"test_32x32.mat: {needle}"):
        prepare_dataset("svhn", str(tmp_path), False, 0, 0, seed=0)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_missing_files_and_no_network_is_a_clear_error(tmp_path, monkeypatch, name):
    _no_debian_dirs(monkeypatch, tmp_path)
    calls = []

    def offline(*args):
        calls.append(args)
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(kdata.registry, "_torchvision_download", offline)
    with pytest.raises(DatasetError) as e:
        prepare_dataset(name, None, True, 0, 0, seed=0)
    msg = str(e.value)
    assert calls == [(name, Path("data/raw"), False)]
    assert f"dataset '{name}' not found" in msg and "'data/raw'" in msg
    assert "download to data/raw (failed: ConnectionError: [Errno -3] Temporary failure" in msg
    first = {"mnist": "t10k-images-idx3-ubyte", "fashion_mnist": "t10k-images-idx3-ubyte", "cifar10": "data_batch_5",
             "cifar100": "'meta'", "svhn": "test_32x32.mat"}[name]
    assert first in msg and "data.root" in msg
    with pytest.raises(DatasetError, match=r"no download \(data.download is false\)"):
        prepare_dataset(name, None, False, 0, 0, seed=0)
    assert len(calls) == 1  # download: false never calls the downloader


def _fake_torchvision_download(name, download_dir, svhn_extra=False):
    """Writes what torchvision's downloader leaves behind, in its layout under download_dir."""
    if name in ("mnist", "fashion_mnist"):
        raw = download_dir / {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name] / "raw"
        write_fake_idx(raw, n_train=30, n_test=10, gz=False)
        write_fake_idx(raw, n_train=30, n_test=10, gz=True)  # torchvision keeps the archives too
    elif name in ("cifar10", "cifar100"):
        write_fake_cifar(download_dir, name, n_train=30, n_test=10)
    else:
        write_fake_svhn(download_dir, n_train=30, n_test=10, n_extra=10 if svhn_extra else 0)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_download_lands_in_data_raw_and_is_read_from_there(tmp_path, monkeypatch, name):
    _no_debian_dirs(monkeypatch, tmp_path)
    calls = []
    monkeypatch.setattr(kdata.registry, "_torchvision_download", lambda *a: (calls.append(a), _fake_torchvision_download(*a)))
    extra = name == "svhn"
    d = prepare_dataset(name, None, True, 0, 0, seed=0, svhn_extra=extra)
    assert calls == [(name, Path("data/raw"), extra)]
    assert d["train_x"].shape[0] == (40 if extra else 30) and d["test_x"].shape[0] == 10
    prepare_dataset(name, None, True, 0, 0, seed=0, svhn_extra=extra)
    assert len(calls) == 1  # the second run finds data/raw and does not download again


def test_explicit_root_of_another_dataset_names_what_is_expected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the repository: only a directory inside it has its contents listed
    write_fake_idx(tmp_path, n_train=10, n_test=10)
    with pytest.raises(DatasetError) as e:
        prepare_dataset("cifar10", str(tmp_path), True, 0, 0, seed=0)
    msg = str(e.value)
    assert "is not a 'cifar10' dataset directory" in msg and "data_batch_1" in msg and "batches.meta" in msg
    assert "in cifar-10-batches-py/ under it or in it" in msg and "train-images-idx3-ubyte.gz" in msg
    written = write_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    (written["dir"] / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py holds some of them but lacks \['data_batch_4'\]"):
        prepare_dataset("cifar10", str(tmp_path), True, 0, 0, seed=0)


def test_prepared_cifar_works_with_the_loader_crop_and_flip(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=40, n_test=10)
    d = prepare_dataset("cifar10", str(tmp_path), False, 0, 0, seed=0)
    x = d["train_x"]
    idx_labels = torch.arange(len(x))  # labels = source index, to find each output's source image
    loader = TensorLoader(x, idx_labels, [0.0] * 3, [1 / 255.0] * 3, batch_size=16, train=True, crop_padding=4,
                          hflip=d["hflip"], seed=0)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen, flipped, shifted = 0, 0, 0
    for xb, yb in loader:
        assert xb.shape[1:] == (3, 32, 32) and xb.dtype == torch.float32
        for img, src in zip(xb.round().to(torch.uint8), yb):
            # one offset and one flip for all three channels: the channels stay aligned
            hits = []
            for dy in range(9):
                for dx in range(9):
                    window = padded[src, :, dy:dy + 32, dx:dx + 32]
                    hits += [(dy, dx, f) for f, w in ((False, window), (True, window.flip(-1))) if torch.equal(w, img)]
            assert hits, "augmented image is not a (flipped) crop of its padded source"
            flipped += all(f for _, _, f in hits)
            shifted += all((dy, dx) != (4, 4) for dy, dx, _ in hits)
            seen += 1
    assert seen == 40 and 5 < flipped < 35 and shifted > 30
    (xb, yb), *_ = TensorLoader(x, d["train_y"], d["mean"], d["std"], batch_size=40, train=False)
    assert torch.allclose(xb.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)  # the train stats normalise train
    assert torch.allclose(xb.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


def test_registry_is_complete_and_consistent():
    import typing

    from kdprune.params import DATASETS, DataParams
    assert set(kdata.REGISTRY) | set(kdata.FOLDER_DATASETS) == set(DATASETS) \
        == set(typing.get_args(typing.get_type_hints(DataParams)["name"]))
    assert {n: i.hflip for n, i in kdata.REGISTRY.items()} == {
        "mnist": False, "svhn": False, "fashion_mnist": True, "cifar10": True, "cifar100": True}
    for name, info in kdata.REGISTRY.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.channels == (1 if "mnist" in name else 3)
        assert info.image_size == ((28, 28) if "mnist" in name else (32, 32))
        assert len(set(info.classes)) == len(info.classes) == (100 if name == "cifar100" else 10)
    c100 = kdata.REGISTRY["cifar100"].classes
    assert list(c100) == sorted(c100) and c100[0] == "apple" and c100[-1] == "worm"  # the meta file's order


def test_channel_stats_are_exact():
    x = torch.randint(0, 256, (50, 3, 5, 7), dtype=torch.uint8)
    mean, std = kdata.channel_stats(x, chunk=7)  # chunks that do not divide N
    xd = x.double() / 255
    assert mean == xd.mean(dim=(0, 2, 3)).float().tolist() and std == xd.std(dim=(0, 2, 3)).float().tolist()
    f32 = torch.tensor([0.2]).tolist()
    assert kdata.channel_stats(torch.full((4, 1, 2, 2), 51, dtype=torch.uint8)) == (f32, [0.0])


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="needs the dataset-fashion-mnist package")
def test_published_fashion_mnist_stats_match_the_real_files():
    x = torch.from_numpy(read_idx("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")).unsqueeze(1)
    mean, std = kdata.channel_stats(x)
    info = kdata.REGISTRY["fashion_mnist"]
    assert mean == pytest.approx(info.mean, abs=5e-5) and std == pytest.approx(info.std, abs=5e-5)


# ---- hostile and corrupt data files (issue #13): each test is a probe that got through before ----


def _peak_traced_bytes(fn, *args):
    """Run fn(*args) and return (its exception or None, the peak of Python/numpy allocations during it)."""
    tracemalloc.start()
    try:
        fn(*args)
        err = None
    except Exception as e:  # noqa: BLE001
        err = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return err, peak


@pytest.mark.parametrize("split,subset", [("train", 0), ("test", 0), ("train", 5), ("test", 5)])
def test_empty_split_is_refused(tmp_path, split, subset):
    """Probe: an empty test split gave acc_teacher 0.0 and exit 0; an empty train split, ZeroDivisionError."""
    write_fake_idx(tmp_path, n_train=0 if split == "train" else 40, n_test=0 if split == "test" else 10)
    name = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}[split]
    sub = f", data.{split}_subset = 5" if subset else ""
    with pytest.raises(DatasetError, match=rf"/{name} \({split} split{sub}\): holds no images"):
        prepare_dataset("mnist", str(tmp_path), False, subset if split == "train" else 0,
                        subset if split == "test" else 0, seed=0)


def test_empty_split_is_a_one_line_error_of_the_prepare_stage(tmp_path):
    from kdprune.params import params_from_dict

    write_fake_idx(tmp_path / "raw", n_train=40, n_test=0)
    p = params_from_dict({s: {} for s in ("data", "model", "teacher", "prune", "distill")}).to_dict()
    p["data"].update(name="mnist", root=str(tmp_path / "raw"), download=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "(test split): holds no images" in r.stderr, r.stderr
    assert not (tmp_path / "data" / "prepared" / "dataset.pt").exists()


def test_constant_train_split_is_refused(tmp_path, monkeypatch):
    """Probe: constant pixels gave std 0, so normalisation divided by zero and training diverged to NaN."""
    root = tmp_path / "r"
    root.mkdir()
    files = kdata.REGISTRY["mnist"].files
    for split, n in (("train", 40), ("test", 10)):
        write_idx(root / f"{files[split + '_images']}.gz", np.full((n, 28, 28), 7, np.uint8))
        write_idx(root / f"{files[split + '_labels']}.gz", (np.arange(n) % 10).astype(np.uint8))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz \(train split\): channel 0 has mean 0.027"
                                           r"\d* and std 0.0: every pixel has the same value"):
        prepare_dataset("mnist", str(root), False, 0, 0, seed=0)
    write_fake_idx(root, n_train=40, n_test=10)  # real-looking pixels, but the statistics come out NaN
    monkeypatch.setattr(kdata.prepare, "channel_stats", lambda x: ([float("nan")], [0.3]))
    with pytest.raises(DatasetError, match=r"channel 0 has mean nan and std 0.3: not finite"):
        prepare_dataset("mnist", str(root), False, 0, 0, seed=0)


# CIFAR pickles that only use the allowed numpy globals, but not the way numpy writes an array
def _pickled_batch(data_expr: bytes, n: int) -> bytes:
    labels = b"](" + b"K\x00" * n + b"e"
    return b"\x80\x02}(X\x04\x00\x00\x00data" + data_expr + b"X\x06\x00\x00\x00labels" + labels + b"u."


def _zero_stride(n: int) -> bytes:  # numpy.ndarray((n, 3072), dtype('u1'), b'\0', 0, (0, 0)): one byte, n images
    return (b"cnumpy\nndarray\n(J" + struct.pack("<i", n) + b"M\x00\x0c\x86cnumpy\ndtype\nX\x02\x00\x00\x00u1\x85R"
            b"C\x01\x00K\x00K\x00K\x00\x86tR")


def _uninitialised(n: int) -> bytes:  # _reconstruct(ndarray, (n, 3072), 'B') with no __setstate__: np.empty
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ" + struct.pack("<i", n) +
            b"M\x00\x0c\x86X\x01\x00\x00\x00B\x87R")


@pytest.mark.parametrize("make,needle", [(_zero_stride, r"refusing numpy.ndarray\(...\) called from a pickle"),
                                         (_uninitialised, r"refusing numpy _reconstruct with other arguments")])
def test_cifar_pickle_cannot_declare_memory_the_file_does_not_hold(tmp_path, make, needle):
    """Probe: a 147-byte pickle of a zero-stride array became a 1.5 GB dataset.pt (here 10000 images);
    _reconstruct with a shape and no data gave uninitialised memory as images."""
    written = write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    (written["dir"] / "data_batch_2").write_bytes(_pickled_batch(make(10000), 10000))
    with pytest.raises(DatasetError, match=rf"data_batch_2: {needle}"):
        prepare_dataset("cifar10", str(tmp_path), False, 0, 0, seed=0)


def test_cifar_batch_with_more_images_than_the_published_file_is_refused(tmp_path, monkeypatch):
    info = kdata.REGISTRY["cifar100"]
    monkeypatch.setitem(kdata.REGISTRY, "cifar100", dataclasses.replace(info, max_images={"train": 19, "test": 10}))
    write_fake_cifar(tmp_path, "cifar100", n_train=20, n_test=10)
    with pytest.raises(DatasetError, match=r"cifar-100-python/train: declares 20 images; the published file holds 19"):
        prepare_dataset("cifar100", str(tmp_path), False, 0, 0, seed=0)


def test_pickle_memo_index_cannot_allocate_a_memo_table(tmp_path):
    """Probe: a 10-byte pickle (LONG_BINPUT 2**25) made the unpickler allocate 512 MB (2**32: 64 GB)."""
    written = write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    (written["dir"] / "test_batch").write_bytes(b"\x80\x02K\x00r" + struct.pack("<I", 1 << 22) + b".")
    err, peak = _peak_traced_bytes(prepare_dataset, "cifar10", str(tmp_path), False, 0, 0, 0)
    assert isinstance(err, DatasetError) and "test_batch: refusing a pickle memo index of 4,194,304" in str(err), err
    assert peak < 16 << 20


def _dag(depth: int, leaf, pair):
    for _ in range(depth):
        leaf = pair(leaf)
    return leaf


@pytest.mark.parametrize("where", ["labels", "keys", "names"])
def test_pickled_shared_structure_is_not_expanded(tmp_path, where):
    """Probe: nested lists/tuples sharing their halves pickle in a few hundred bytes, but np.asarray (labels) or
    str() (an error message's dict keys, class names) expands them to 2**depth leaves."""
    written = write_fake_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    deep = _dag(21, 0, lambda x: [x, x]) if where != "keys" else _dag(21, (), lambda x: (x, x))
    if where == "labels":
        path, needle = written["dir"] / "data_batch_1", r"'labels' must be 4 integers, one per image, got a list of 2"
        obj = {b"data": written["train"][0][:4].reshape(4, -1), b"labels": deep}
    else:
        path, needle = written["dir"] / "batches.meta", r"expected 'label_names', a list of 10 class names"
        obj = {deep: 1, b"label_names": [b"a"] * 3} if where == "keys" else {b"label_names": [deep] * 10}
    path.write_bytes(pickle.dumps(obj, protocol=2))
    assert path.stat().st_size < 20000  # 2**21 leaves
    err, peak = _peak_traced_bytes(prepare_dataset, "cifar10", str(tmp_path), False, 0, 0, 0)
    assert isinstance(err, DatasetError) and re.search(needle, str(err)), err
    assert len(str(err)) < 1000 and peak < 16 << 20, (len(str(err)), peak)


def _gz_idx(path, shape, payload_chunks):
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(bytes([0, 0, 8, len(shape)]) + struct.pack(f">{len(shape)}I", *shape))
        for chunk in payload_chunks:
            f.write(chunk)


def test_gzip_bomb_idx_is_decompressed_only_to_its_declared_size(tmp_path):
    """Probe: a gzip bomb behind a small IDX header was decompressed whole (here 64 MB; at scale, MemoryError)."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _gz_idx(path, (40, 28, 28), [bytes(1 << 20)] * 64)
    assert path.stat().st_size < 1 << 20
    err, peak = _peak_traced_bytes(read_idx, path)
    assert isinstance(err, DatasetError) and "IDX payload is more than 31360 bytes" in str(err), err
    assert peak < 8 << 20, peak


def test_gzip_idx_header_declaring_more_than_the_file_can_hold_is_refused(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _gz_idx(path, (60000, 28, 28), [bytes(100)])
    with pytest.raises(DatasetError, match=r"declares 47,040,016 bytes, more than a gzip file of \d+ bytes can expand to"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_header_whose_size_overflows_int64_is_refused(tmp_path, gz):
    """Probe: a header of 65536^4 made np.prod wrap to 0, which 'matched' an empty payload (then ValueError)."""
    path = tmp_path / f"x-idx4-ubyte{'.gz' if gz else ''}"
    header = bytes([0, 0, 8, 4]) + struct.pack(">4I", *(65536,) * 4)
    path.write_bytes(gzip.compress(header) if gz else header)
    assert math.prod((65536,) * 4) == 2 ** 64 and int(np.prod((65536,) * 4)) == 0
    with pytest.raises(DatasetError, match=r"declares 18,446,744,073,709,551,6\d\d bytes, over the memory budget of "
                                           r"2,147,483,648 bytes \(kdprune.data.MEMORY_BUDGET\)"):
        read_idx(path)


def test_idx_limits_apply_to_the_torchvision_layout_too(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    write_fake_idx(raw, n_train=40, n_test=10, gz=False)
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: the IDX header \(shape \(40, 28, 28\)\) declares "
                                           r"31,360 bytes, over the memory budget of 1,000 bytes"):
        monkeypatch.setattr(kdata.limits, "MEMORY_BUDGET", 1000)
        prepare_dataset("mnist", str(tmp_path), False, 0, 0, seed=0)
    monkeypatch.undo()
    info = kdata.REGISTRY["mnist"]
    monkeypatch.setitem(kdata.REGISTRY, "mnist", dataclasses.replace(
        info, max_images={**info.max_images, "test_labels": 9}))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte: declares 10 images; the published file holds 9"):
        prepare_dataset("mnist", str(tmp_path), False, 0, 0, seed=0)


def _mat5_variable(name: bytes, dims, mclass: int, mdtype: int, nbytes: int, chunks, imaginary: int = 0):
    """One MATLAB 5 miMATRIX element, as chunks of bytes; ``nbytes`` is what its data element declares."""
    dims_el = struct.pack(f"<{len(dims)}i", *dims)
    dims_el = struct.pack("<II", 5, 4 * len(dims)) + dims_el + bytes(-len(dims_el) % 8)
    flags = struct.pack("<IIII", 6, 8, mclass | (0x0800 if imaginary else 0), 0)
    name_el = struct.pack("<I", (len(name) << 16) | 1) + name.ljust(4, b"\0")
    parts = [(nbytes, chunks)] + ([(imaginary, [bytes(imaginary)])] if imaginary else [])
    body = len(flags) + len(dims_el) + len(name_el) + sum(8 + n + (-n % 8) for n, _ in parts)
    yield struct.pack("<II", 14, body) + flags + dims_el + name_el
    for n, data in parts:
        yield struct.pack("<II", mdtype, n)
        yield from data
        yield bytes(-n % 8)


def _write_mat5(path, variables):
    """A MATLAB 5 .mat file of zlib-compressed variables (as SVHN's files are), streamed: a bomb stays small."""
    with open(path, "wb") as f:
        f.write(b"MATLAB 5.0 MAT-file, test".ljust(116, b" ") + bytes(8) + struct.pack("<H", 0x0100) + b"IM")
        for var in variables:
            c = zlib.compressobj(1)
            data = b"".join(c.compress(chunk) for chunk in var) + c.flush()
            f.write(struct.pack("<II", 15, len(data)) + data)


def _svhn_x(n, nbytes=None, imaginary=0):
    nbytes = 3072 * n if nbytes is None else nbytes
    return _mat5_variable(b"X", (32, 32, 3, n), 9, 2, nbytes, (bytes(min(k, 1 << 20)) for k in
                                                               range(nbytes, 0, -(1 << 20))), imaginary)


def _svhn_y(n):
    return _mat5_variable(b"y", (n, 1), 9, 2, n, [bytes([1]) * n])


@pytest.mark.parametrize("probe", ["too_many_images", "data_element_bomb", "imaginary_part", "cell_labels",
                                   "labels_mismatch", "budget"])
def test_svhn_mat_sizes_are_checked_before_loading(tmp_path, monkeypatch, probe):
    """Probe: a compressed .mat declaring a million zero images became a million-image test split with exit 0
    (here 30,000: more than the published 26,032); a data element declaring more bytes than the dimensions
    hold, or an imaginary part, was decompressed in full before the shapes were compared."""
    import scipy.io

    write_fake_svhn(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "test_32x32.mat"
    if probe == "too_many_images":  # through prepare, which knows the published count
        _write_mat5(path, [_svhn_x(30000), _svhn_y(30000)])
        with pytest.raises(DatasetError, match="test_32x32.mat: declares 30,000 images; the published file holds 26,032"):
            prepare_dataset("svhn", str(tmp_path), False, 0, 0, seed=0)
        return
    if probe == "data_element_bomb":
        _write_mat5(path, [_svhn_x(10, nbytes=64 << 20), _svhn_y(10)])
        needle = r"'X' is uint8 \(32, 32, 3, 10\) but its data element declares 67,108,864 bytes"
    elif probe == "imaginary_part":
        _write_mat5(path, [_svhn_x(10, imaginary=64 << 20), _svhn_y(10)])
        needle = r"'X' must be one real numeric matrix, got uint8 \(32, 32, 3, 10\)"
    elif probe == "cell_labels":
        y = np.empty((10, 1), dtype=object)
        y[:, 0] = [np.ones((2, 2))] * 10
        scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 10), np.uint8), "y": y}, do_compression=True)
        needle = r"'y' must be one real numeric matrix, got cell \(10, 1\)"
    elif probe == "labels_mismatch":
        _write_mat5(path, [_svhn_x(10), _svhn_y(9)])
        needle = r"'y' must be 10 integer labels \(N, 1\), got uint8 \(9, 1\)"
    else:
        monkeypatch.setattr(kdata.limits, "MEMORY_BUDGET", 30000)
        needle = r"'X' \(uint8 \(32, 32, 3, 10\)\) declares 30,720 bytes, over the memory budget of 30,000 bytes"

    def no_loadmat(*a, **k):
        raise AssertionError("loadmat called on a file whose headers should have been refused")
    monkeypatch.setattr(scipy.io, "loadmat", no_loadmat)
    with pytest.raises(DatasetError, match=rf"test_32x32.mat: {needle}"):
        kdata.read_svhn_mat(path)


def test_hand_written_mat5_file_reads(tmp_path):
    """The writer the probes above use makes files that loadmat and the header checks accept."""
    write_fake_svhn(tmp_path, n_train=20, n_test=10)
    _write_mat5(tmp_path / "test_32x32.mat", [_svhn_x(10), _svhn_y(10)])
    d = prepare_dataset("svhn", str(tmp_path), False, 0, 0, seed=0)
    assert d["test_x"].shape == (10, 3, 32, 32) and d["test_y"].tolist() == [1] * 10


def test_every_data_file_has_an_image_limit():
    for name, info in kdata.REGISTRY.items():
        assert set(info.max_images) == {r for r in info.files if r != "meta"}, name
    assert kdata.MEMORY_BUDGET >= 531131 * 3072  # SVHN's extra 'X', the largest real array, fits the budget
