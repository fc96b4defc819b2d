import dataclasses
import gzip

import numpy as np
import pytest
import torch

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
    from tests.conftest import write_fake_dataset

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
def test_wrong_format_dataset_dir_names_the_problem(tmp_path, layout):
    """An explicit data.root in the wrong format is an error naming what is expected and what is there,
    never a silent fall-back to the system copy in /usr/share/datasets."""
    root = tmp_path / "root"
    root.mkdir()
    if layout == "cifar_pickles":
        (root / "cifar-10-batches-py").mkdir()
        (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04junk")
    elif layout == "pngs":
        for i in range(3):
            (root / f"img{i}.png").write_bytes(b"\x89PNG\r\n")
    else:  # three of the four IDX files
        from tests.conftest import write_fake_dataset
        write_fake_dataset(root)
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as e:
        prepare_dataset("fashion_mnist", str(root), True, 0, 0, seed=0)
    msg = str(e.value)
    assert "is not a 'fashion_mnist' dataset directory" in msg and "t10k-labels-idx1-ubyte" in msg, msg
    assert {"cifar_pickles": "cifar-10-batches-py", "pngs": "img0.png", "partial_idx": "t10k-images"}[layout] in msg


def test_right_names_wrong_content_is_refused(tmp_path):
    from tests.conftest import write_fake_dataset
    root = write_fake_dataset(tmp_path / "root", gz=False)
    (root / "train-images-idx3-ubyte").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte: not an IDX file"):
        prepare_dataset("fashion_mnist", str(root), False, 0, 0, seed=0)
