"""Image folders (data.name: imagefolder): prepare on the tensor and stream paths, their equality, the errors, the
params, preprocessing that matches a plain torchvision script, and torchvision weights' transforms."""
import copy
import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kdprune import stage
from kdprune.data import imagefolder, streaming
from kdprune.data import DatasetError, TensorLoader, channel_stats, read_idx
from kdprune.params import ParamsError, params_from_dict
from kdprune.data.preprocessing import folder_settings, override_stats, pretrained_interpolation, pretrained_preprocessing
from tests.helpers import default_params, make_fake_images

ROOT = Path(__file__).resolve().parents[2]
FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = {0: "T-shirt_top", 1: "Trouser", 2: "Pullover"}  # the first three, as directory names


def fashion_images() -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST test images (the Debian package's IDX files); learnable synthetic ones without it."""
    if (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        return (read_idx(FASHION / "t10k-images-idx3-ubyte.gz"),
                read_idx(FASHION / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    return make_fake_images(600)


@pytest.fixture(scope="module")
def fm_folder(tmp_path_factory):
    """3 classes of real Fashion-MNIST images as grayscale PNGs: 40 train + 12 val each. Returns the root and,
    per split, the images and labels in the order kdprune (and torchvision) read them."""
    root = tmp_path_factory.mktemp("fm") / "folder"
    x, y = fashion_images()
    written = {}
    names = sorted(FASHION_CLASSES.values())
    for split, lo, n in (("train", 0, 40), ("val", 5000, 12)):
        xs, ys = [], []
        for label, name in enumerate(names):
            digit = next(k for k, v in FASHION_CLASSES.items() if v == name)
            idx = (np.nonzero(y[lo:] == digit)[0][:n] + lo) if len(y) > lo else np.nonzero(y == digit)[0][:n]
            d = root / split / name
            d.mkdir(parents=True)
            for k, i in enumerate(idx):
                Image.fromarray(x[i]).save(d / f"{k:03d}.png")
                xs.append(x[i])
                ys.append(label)
        written[split] = (torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys))
    return root, written


def write_rgb_folder(root: Path, per_class=(12, 5), seed=0) -> Path:
    """3 classes of generated RGB images of various sizes, PNG and JPEG, one grayscale PNG among them, a nested
    sub-directory and a non-image file (ignored)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(("b_cat", "A_dog", "c")):  # sorted: A_dog, b_cat, c
            d = root / split / name
            d.mkdir(parents=True)
            for k in range(n):
                h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
                img = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
                img[h // 4: h // 2, w // 4: w // 2, c] = 230
                sub = d / "nested" if k % 4 == 3 else d
                sub.mkdir(exist_ok=True)
                if k == 1 and c == 0:
                    Image.fromarray(img[..., 0]).save(sub / f"{k:02d}.png")  # grayscale among RGB
                elif k % 2:
                    Image.fromarray(img).save(sub / f"{k:02d}.JPG", quality=90)
                else:
                    Image.fromarray(img).save(sub / f"{k:02d}.png")
            (d / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    return write_rgb_folder(tmp_path_factory.mktemp("rgb") / "folder")


def folder_params(root: Path, **data) -> object:
    raw = copy.deepcopy(default_params())
    raw["data"].update({"name": "imagefolder", "root": str(root), "num_workers": 0, "crop_padding": 2, **data})
    raw["teacher"]["batch_size"] = 32
    raw["evaluate"]["batch_size"] = 25
    raw["runtime"]["channels_last"] = False
    return params_from_dict(raw)


def prepare(root: Path, **kw) -> dict:
    kw = {"image_size": 28, "num_workers": 0, **kw}
    return imagefolder.prepare(str(root), **kw)


# ---- prepare: the tensor path ----

def test_tensor_path_stores_the_png_pixels_labels_and_classes(fm_folder):
    root, written = fm_folder
    d = prepare(root, loader="tensor")
    assert d["loader"] == "tensor" and d["name"] == "imagefolder" and d["hflip"] is True
    assert {"name", "classes", "hflip", "source", "train_x", "train_y", "test_x", "test_y", "mean", "std"} <= set(d)
    assert d["classes"] == sorted(FASHION_CLASSES.values())
    for split in ("train", "test"):
        x, y = written["train" if split == "train" else "val"]
        assert d[f"{split}_x"].dtype == torch.uint8 and d[f"{split}_x"].shape == x.shape  # (N, 1, 28, 28): gray
        assert torch.equal(d[f"{split}_x"], x) and torch.equal(d[f"{split}_y"], y)
    assert (d["mean"], d["std"]) == channel_stats(d["train_x"]) == (d["computed_mean"], d["computed_std"])


def test_rgb_images_match_torchvision_imagefolder_with_resize_and_centre_crop(rgb_folder):
    from torchvision import datasets, transforms
    from torchvision.transforms.functional import pil_to_tensor

    d = prepare(rgb_folder, image_size=24, resize_size=30, loader="tensor")
    assert d["preprocessing"] == {"resize_size": 30, "image_size": 24, "interpolation": "bilinear", "channels": 3}
    tf = transforms.Compose([transforms.Resize(30), transforms.CenterCrop(24), pil_to_tensor])
    for split, dirname in (("train", "train"), ("test", "val")):
        ref = datasets.ImageFolder(str(rgb_folder / dirname), transform=tf)
        assert d["classes"] == ref.classes == ["A_dog", "b_cat", "c"]
        assert len(ref) == len(d[f"{split}_y"]) and d[f"{split}_y"].tolist() == ref.targets  # order, nested dirs
        for i in range(len(ref)):
            assert torch.equal(d[f"{split}_x"][i], ref[i][0]), ref.samples[i][0]


def test_train_and_val_subsets_are_class_stratified(rgb_folder):
    d = prepare(rgb_folder, image_size=16, loader="tensor", train_subset=9, test_subset=6, seed=3)
    assert d["train_y"].bincount().tolist() == [3, 3, 3] and d["test_y"].bincount().tolist() == [2, 2, 2]


# ---- the stream path ----

def test_stream_path_stores_an_index_the_arrays_keys_and_shapes_only(fm_folder):
    root, written = fm_folder
    d = prepare(root, loader="stream")
    assert d["loader"] == "stream" and "index" in d and set(d["decoded"]) == {"train", "test"}
    assert d["decoded"]["train"]["shape"] == list(written["train"][0].shape)
    assert len(d["decoded"]["train"]["sha256"]) == 64
    assert d["train_x"].shape == written["train"][0].shape and d["train_x"].device.type == "meta"
    with pytest.raises(NotImplementedError):  # the stages read the shape; a pixel read fails loudly
        d["train_x"].to("cpu")
    t = prepare(root, loader="tensor")
    assert (d["mean"], d["std"]) == (t["mean"], t["std"])  # exact, over the whole train split
    for split in ("train", "test"):  # the array holds the tensor path's pixels
        assert torch.equal(torch.from_numpy(streaming.split_array(d, split).read(np.arange(len(t[f"{split}_y"])))),
                           t[f"{split}_x"])
    buf1, buf2 = io.BytesIO(), io.BytesIO()
    torch.save(d, buf1)
    torch.save(prepare(root, loader="stream"), buf2)
    assert buf1.getvalue() == buf2.getvalue()  # a deterministic DVC output


@pytest.mark.parametrize("folder", ["fm", "rgb"])
def test_stream_yields_exactly_the_tensor_paths_batches(folder, fm_folder, rgb_folder):
    root = fm_folder[0] if folder == "fm" else rgb_folder
    size = {"fm": {}, "rgb": {"image_size": 20, "resize_size": 24}}[folder]
    tensor = prepare(root, loader="tensor", **size)
    stream = prepare(root, loader="stream", **size)
    params = folder_params(root, num_workers=2)
    loaders = {}
    for name, d in (("tensor", tensor), ("stream", stream)):
        loaders[name] = (stage.train_loader(params, d, params.teacher), stage.test_loader(params, d))
    assert all(isinstance(ld, streaming.StreamLoader) for ld in loaders["stream"])
    assert all(type(ld) is TensorLoader for ld in loaders["tensor"])
    (t_train, t_test), (s_train, s_test) = loaders["tensor"], loaders["stream"]
    assert len(s_train) == len(t_train) and len(s_test) == len(t_test) and s_train.batch_size == t_train.batch_size
    n = 0
    for (xs, ys), (xt, yt) in zip(s_test, t_test, strict=True):  # eval: the same images, labels, normalisation
        assert xs.dtype == torch.float32 and torch.equal(xs, xt) and torch.equal(ys, yt)
        n += len(ys)
    assert n == len(tensor["test_y"])
    for epoch in range(3):  # train: the same order, crops and flips from the same seed (both on the CPU)
        for (xs, ys), (xt, yt) in zip(s_train, t_train, strict=True):
            assert xs.shape == xt.shape and torch.equal(ys, yt) and torch.equal(xs, xt), epoch
    assert torch.equal(s_train.generator.get_state(), t_train.generator.get_state())
    for (xs, ys), (xt, yt) in zip(stage.train_eval_loader(params, stream, "cpu", limit=7),
                                  stage.train_eval_loader(params, tensor, "cpu", limit=7),
                                  strict=True):  # 7 evenly spaced rows of the train array, unaugmented
        assert torch.equal(xs, xt) and torch.equal(ys, yt)


def test_prefetch_does_not_change_the_batches_and_ddp_ranks_get_the_tensor_paths_shards(rgb_folder):
    from kdprune.train.distributed import ShardedLoader

    d = prepare(rgb_folder, image_size=16, loader="stream")
    t = prepare(rgb_folder, image_size=16, loader="tensor")
    kw = dict(train=True, crop_padding=2, hflip=True, seed=5)

    def batches(prefetch=2, rank=0, world=1, epochs=2):
        ld = streaming.StreamLoader(streaming.split_array(d, "train"), d["train_y"], d["mean"], d["std"], 10,
                                    rank=rank, world=world, prefetch=prefetch, **kw)
        return [b for _ in range(epochs) for b in ld]

    single = batches()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, batches(prefetch=0), strict=True))
    for rank in range(3):  # each rank's shard is the tensor path's (ShardedLoader's), epoch after epoch
        ref = ShardedLoader(t["train_x"], t["train_y"], t["mean"], t["std"], 10, rank=rank, world=3, **kw)
        ref_batches = [b for _ in range(2) for b in ref]
        for (xs, ys), (xt, yt) in zip(batches(rank=rank, world=3), ref_batches, strict=True):
            assert torch.equal(xs, xt) and torch.equal(ys, yt)
    shards = [batches(0, rank, 3) for rank in range(3)]
    for i, (x, y) in enumerate(single):
        xs = torch.cat([s[i][0] for s in shards])
        ys = torch.cat([s[i][1] for s in shards])
        assert torch.equal(xs[:len(y)], x) and torch.equal(ys[:len(y)], y)  # the last batch is padded to 3k


def test_ddp_ranks_read_disjoint_images_of_the_same_array(rgb_folder):
    d = prepare(rgb_folder, image_size=16, loader="stream")
    read: dict[int, list[np.ndarray]] = {}
    for rank in range(2):
        array = streaming.split_array(d, "train")
        real = array.read
        array.read = lambda rows, _r=rank, _real=real: read.setdefault(_r, []).append(rows.copy()) or _real(rows)
        list(streaming.StreamLoader(array, d["train_y"], d["mean"], d["std"], 12, train=True, crop_padding=2,
                                    hflip=True, rank=rank, world=2, prefetch=0))
    n = len(d["train_y"])  # 36: three batches of 12, six images per rank each
    for a, b in zip(read[0], read[1], strict=True):
        assert len(a) == len(b) == 6 and not set(a.tolist()) & set(b.tolist())
    assert sorted(np.concatenate(read[0] + read[1]).tolist()) == list(range(n))


def test_training_on_the_stream_path_gives_the_tensor_paths_model_and_resumes_its_order(rgb_folder):
    from kdprune.params import RuntimeParams, TrainParams
    from kdprune.train.loop import fit

    params = folder_params(rgb_folder, image_size=16)
    cfg = TrainParams(epochs=2, batch_size=16, lr=0.05, eval_every=0)
    runtime = RuntimeParams(bf16=False, channels_last=False)
    weights, histories = [], []
    for loader in ("tensor", "stream"):
        data = prepare(rgb_folder, image_size=16, loader=loader)
        model = small_model(3, 3).train()
        histories.append(fit(model, stage.train_loader(params, data, cfg), stage.test_loader(params, data), cfg,
                             runtime=runtime, log=lambda _: None))
        weights.append(model.state_dict())
    assert [h["train_loss"] for h in histories[0]] == [h["train_loss"] for h in histories[1]]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    ld = stage.train_loader(params, prepare(rgb_folder, image_size=16, loader="stream"), cfg)
    state = ld.generator.get_state()  # what a resume checkpoint saves; nothing random happens in the workers
    first = list(ld)
    ld.generator.set_state(state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, ld, strict=True))


def test_auto_takes_the_tensor_path_within_the_budget_and_streams_above_it(rgb_folder):
    assert imagefolder.choose_loader("auto", 1 << 20, 1) == "tensor"
    assert imagefolder.choose_loader("auto", (1 << 20) + 1, 1) == "stream"
    assert imagefolder.choose_loader("stream", 1, 4096) == "stream"
    d = prepare(rgb_folder, image_size=96, memory_budget_mb=1)  # 51 images x 3 x 96 x 96 = 1.3 MiB
    assert d["loader"] == "stream"
    assert len(d["mean"]) == 3 and all(0 < v < 1 for v in d["mean"] + d["std"])  # from a sample within budget
    assert prepare(rgb_folder, image_size=32, memory_budget_mb=1)["loader"] == "tensor"  # 0.15 MiB
    with pytest.raises(DatasetError, match=r"data.loader = tensor: the decoded images need 1.3 MiB, more than "
                                           r"data.memory_budget_mb = 1; .* set data.loader to stream"):
        prepare(rgb_folder, image_size=96, memory_budget_mb=1, loader="tensor")


# ---- errors: one line naming the file or directory ----

def tiny_folder(root: Path, classes=("a", "b"), n=2) -> Path:
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (12, 10), (40 * k, 100 + 20 * k, 200 - 30 * k)).save(root / split / c / f"{k}.png")
    return root


def png_declaring(w: int, h: int) -> bytes:
    """A 1x1 PNG whose IHDR chunk (CRC fixed) declares w x h pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def damage(case: str, root: Path, outside: Path) -> str:
    """Damage a tiny folder; returns a regex the error must match."""
    png = root / "train" / "a" / "0.png"
    if case == "corrupt":
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
        return r"train/a/0\.png: not a readable image"
    if case == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
        png.write_bytes(png.read_bytes()[:-3000])
        return r"train/a/0\.png: cannot decode the image .* corrupt or truncated"
    if case == "bomb":
        png.write_bytes(png_declaring(30_000, 30_000))
        return r"train/a/0\.png: its header declares more than 178,956,970 pixels"
    if case == "big":
        png.write_bytes(png_declaring(10_000, 10_000))
        return r"train/a/0\.png: its header declares 10000 x 10000 = 100,000,000 pixels; kdprune decodes at most"
    if case == "empty_class":
        for f in (root / "val" / "b").iterdir():
            f.unlink()
        (root / "val" / "b" / "readme.txt").write_text("no images")
        return r"val/b: empty class directory"
    if case == "classes_differ":
        shutil.copytree(root / "train" / "a", root / "train" / "zebra")
        shutil.copytree(root / "val" / "a", root / "val" / "yak")
        return r"train/ and val/ must have the same class directories; only in train/: \['zebra'\], only in val/: " \
               r"\['yak'\]"
    if case == "missing_val":
        shutil.rmtree(root / "val")
        return r"missing val/; an image folder holds train/<class>/<images>"
    if case == "missing_both":
        shutil.rmtree(root / "val")
        shutil.rmtree(root / "train")
        return r"missing train/ and val/"
    if case == "no_classes":
        for split in ("train", "val"):
            shutil.rmtree(root / split)
            (root / split).mkdir()
        return r"no class directories in train/ and val/"
    if case == "fifo":
        os.mkfifo(root / "train" / "b" / "pipe.png")
        return r"train/b/pipe\.png: not a regular file"
    if case == "dangling_link":
        (root / "val" / "a" / "gone.jpg").symlink_to(root / "val" / "a" / "nothing.jpg")
        return r"val/a/gone\.jpg: not a regular file"
    if case == "link_file_out":
        outside.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(outside / "x.png")
        (root / "train" / "a" / "x.png").symlink_to(outside / "x.png")
        return r"train/a/x\.png: a symbolic link out of data.root"
    if case == "link_class_out":
        shutil.copytree(root / "val" / "b", outside)
        shutil.rmtree(root / "val" / "b")
        (root / "val" / "b").symlink_to(outside, target_is_directory=True)
        return r"val/b: a symbolic link out of data.root"
    if case == "link_split_out":
        shutil.copytree(root / "train", outside)
        shutil.rmtree(root / "train")
        (root / "train").symlink_to(outside, target_is_directory=True)
        return r"train: a symbolic link out of data.root"
    raise AssertionError(case)


ERROR_CASES = ["corrupt", "truncated", "bomb", "big", "empty_class", "classes_differ", "missing_val", "missing_both",
               "no_classes", "fifo", "dangling_link", "link_file_out", "link_class_out", "link_split_out"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_folders_get_one_line_naming_the_file_or_directory(tmp_path, case):
    root = tiny_folder(tmp_path / "root")
    pattern = damage(case, root, tmp_path / "outside")
    with pytest.raises(DatasetError, match=pattern) as e:
        prepare(root, image_size=8, loader="tensor")
    assert "\n" not in str(e.value)


def test_links_inside_the_root_and_a_linked_root_are_followed(tmp_path):
    root = tiny_folder(tmp_path / "root")
    (root / "train" / "a" / "again.png").symlink_to(root / "val" / "a" / "0.png")
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    d = prepare(tmp_path / "link", image_size=8, loader="tensor")
    assert len(d["train_y"]) == 5


def test_too_many_classes_or_files_are_refused(tmp_path, monkeypatch):
    root = tiny_folder(tmp_path / "root", classes=("a", "b", "c"))
    monkeypatch.setattr(imagefolder, "MAX_CLASSES", 2)
    with pytest.raises(DatasetError, match=r"train: more than 2 class directories"):
        prepare(root, image_size=8)
    monkeypatch.setattr(imagefolder, "MAX_CLASSES", 3)
    monkeypatch.setattr(imagefolder, "MAX_FILES", 7)
    with pytest.raises(DatasetError, match=r"root: more than 7 images"):
        prepare(root, image_size=8)


def test_missing_root_and_small_resize(tmp_path):
    with pytest.raises(DatasetError, match=r"data.root = '?.*nope'?: directory not found"):
        prepare(tmp_path / "nope")
    root = tiny_folder(tmp_path / "root")
    with pytest.raises(DatasetError, match=r"data.resize_size = 6 is smaller than data.image_size = 8"):
        prepare(root, image_size=8, resize_size=6)


def test_no_epoch_decodes_an_image_and_a_missing_array_is_rebuilt(tmp_path, monkeypatch):
    root = tiny_folder(tmp_path / "root")
    d = prepare(root, image_size=8, loader="stream")
    ref = [b for b in streaming.StreamLoader(streaming.split_array(d, "test"), d["test_y"], d["mean"], d["std"], 3,
                                             train=False)]
    monkeypatch.setattr(imagefolder.decoded, "batches_for", lambda *a: pytest.fail("decoded an image"))
    monkeypatch.setattr(streaming.decoded, "batches_for", lambda *a: pytest.fail("decoded an image"))
    params = folder_params(root, image_size=8)
    for _ in range(2):  # epochs read the array only
        assert len(list(stage.train_loader(params, d, params.teacher))) == 1
    monkeypatch.undo()
    monkeypatch.setenv("KDPRUNE_DECODED_DIR", str(tmp_path / "decoded"))  # another, empty, cache: rebuilt there
    array = streaming.split_array(d, "test")
    assert array.path.parent == tmp_path / "decoded"
    got = list(streaming.StreamLoader(array, d["test_y"], d["mean"], d["std"], 3, train=False))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, ref, strict=True))


@pytest.mark.parametrize("case", ["corrupt", "changed"])
def test_rebuilding_a_missing_array_from_changed_images_is_one_line(tmp_path, monkeypatch, case):
    root = tiny_folder(tmp_path / "root")
    d = prepare(root, image_size=8, loader="stream")
    monkeypatch.setenv("KDPRUNE_DECODED_DIR", str(tmp_path / "empty"))
    png = root / "val" / "b" / "1.png"
    if case == "corrupt":
        png.write_bytes(os.urandom(png.stat().st_size))
        pattern = r"val/b/1\.png: not a readable image"
    else:  # other pixels, the same file size: only the pixels' sha256 can tell
        Image.new("RGB", (12, 10), (1, 2, 3)).save(png)
        pattern = r"test-[0-9a-f]{64}\.u8: rebuilt from data.root, its pixels hash to .* the images changed since"
        d["index"]["test"]["sizes"][-1] = png.stat().st_size  # as if the size had not changed (the last file)
    with pytest.raises(DatasetError, match=pattern) as e:
        streaming.split_array(d, "test")
    assert "\n" not in str(e.value)
    assert not [p for p in (tmp_path / "empty").iterdir() if not p.name.endswith(".lock")]  # nothing half-written


# ---- normalisation: data.mean / data.std, torchvision weights ----

def test_mean_std_override_the_computed_statistics(fm_folder):
    root, _ = fm_folder
    d = prepare(root, mean=[0.5], std=[0.25])
    assert (d["mean"], d["std"]) == ([0.5], [0.25]) and d["computed_mean"] != [0.5]
    assert prepare(root, std=[0.25])["mean"] == d["computed_mean"]  # each one on its own
    with pytest.raises(ParamsError, match=r"data.mean = \[0.5, 0.5, 0.5\] is invalid: the prepared images have 1 "
                                          r"channel, so it needs 1 value"):
        prepare(root, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    assert override_stats(([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]), None, [1, 1, 1], 3) == ([0.1, 0.2, 0.3], [1.0] * 3)


def test_pretrained_preprocessing_reads_the_weights_transforms_offline(tmp_path, monkeypatch):
    from torchvision.models import EfficientNet_B0_Weights, ResNet50_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert pretrained_preprocessing(ResNet50_Weights.IMAGENET1K_V2) == (232, 224, *imagenet)
    assert pretrained_preprocessing("ResNet50_Weights.IMAGENET1K_V1") == (256, 224, *imagenet)
    assert pretrained_interpolation(ResNet50_Weights.IMAGENET1K_V2) == "bilinear"
    assert pretrained_preprocessing(EfficientNet_B0_Weights.IMAGENET1K_V1) == (256, 224, *imagenet)
    assert pretrained_interpolation("EfficientNet_B0_Weights.IMAGENET1K_V1") == "bicubic"
    with pytest.raises(ParamsError, match=r"torchvision weights 'ResNet50_Weights.NOPE': unknown"):
        pretrained_preprocessing("ResNet50_Weights.NOPE")
    assert not (tmp_path / "torch_home").exists()


def test_folder_settings_take_data_keys_then_the_weights_then_the_defaults():
    from torchvision.models import EfficientNet_B0_Weights, ResNet50_Weights

    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    data = params_from_dict(folder_raw()).data
    assert folder_settings(data) == {"image_size": 224, "resize_size": 224, "interpolation": "bilinear",
                                     "mean": None, "std": None}
    assert folder_settings(data, ResNet50_Weights.IMAGENET1K_V2) == {
        "image_size": 224, "resize_size": 232, "interpolation": "bilinear", "mean": imagenet[0], "std": imagenet[1]}
    assert folder_settings(data, EfficientNet_B0_Weights.IMAGENET1K_V1)["interpolation"] == "bicubic"
    data = params_from_dict(folder_raw(image_size=160, mean=[0.5, 0.5, 0.5], interpolation="bicubic")).data
    assert folder_settings(data, ResNet50_Weights.IMAGENET1K_V2) == {
        "image_size": 160, "resize_size": 160, "interpolation": "bicubic", "mean": [0.5] * 3, "std": imagenet[1]}


def small_model(channels: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(128, classes)).eval()


@pytest.mark.parametrize("loader", ["tensor", "stream"])
def test_kdprune_measures_what_a_plain_torchvision_script_measures(rgb_folder, loader):
    """A user's own evaluation (ImageFolder + Resize + CenterCrop + ToTensor + Normalize) and kdprune's prepared
    data + test loader give the same logits and so the same accuracy (kdprune.measure.accuracy)."""
    from torchvision import datasets, transforms

    from kdprune.measure import accuracy

    mean, std = [0.45, 0.4, 0.35], [0.25, 0.2, 0.3]
    model = small_model(3, 3)
    # the plain script
    tf = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])
    plain = torch.utils.data.DataLoader(datasets.ImageFolder(str(rgb_folder / "val"), transform=tf), batch_size=7)
    with torch.inference_mode():
        ref_logits = torch.cat([model(x) for x, _ in plain])
    ref_y = torch.tensor(plain.dataset.targets)
    ref_acc = 100.0 * float((ref_logits.argmax(1) == ref_y).sum()) / len(ref_y)
    # kdprune: params -> prepare -> the stage's test loader
    params = folder_params(rgb_folder, image_size=32, resize_size=36, mean=mean, std=std, loader=loader)
    d = params.data
    data = imagefolder.prepare(d.root, **folder_settings(d), loader=d.loader, num_workers=d.num_workers)
    test = stage.test_loader(params, data)
    with torch.inference_mode():
        logits = torch.cat([model(x) for x, _ in test])
    assert torch.equal(data["test_y"], ref_y)
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    assert accuracy(model, test) == ref_acc


# ---- params ----

def folder_raw(**data) -> dict:
    raw = copy.deepcopy(default_params())
    raw["data"].update({"name": "imagefolder", "root": "/data/images", **data})
    return raw


def test_image_folder_params_are_valid_with_defaults():
    d = params_from_dict(folder_raw()).data
    assert (d.image_size, d.image_size_or_default, d.resize_size, d.loader, d.memory_budget_mb) == \
        (None, 224, None, "auto", 4096)
    d = params_from_dict(folder_raw(image_size=32, resize_size=36, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2],
                                    loader="stream", memory_budget_mb=16, num_workers=0,
                                    interpolation="bicubic")).data
    assert (d.image_size, d.resize_size, d.mean, d.std, d.loader, d.num_workers) == \
        (32, 36, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], "stream", 0)
    assert params_from_dict(folder_raw(name="fashion_mnist", root=None, mean=[0.3], std=[0.3])).data.mean == [0.3]


@pytest.mark.parametrize("key,value,needle,extra", [
    ("image_size", 4, "[8, 1024]", {}),
    ("image_size", 2048, "[8, 1024]", {}),
    ("image_size", "224", "an integer or null", {}),
    ("image_size", 32, "applies to data.name = imagefolder only", {"name": "cifar10", "root": None}),
    ("resize_size", 100, "[224, 448]", {}),
    ("resize_size", 80, "[32, 64]", {"image_size": 32}),
    ("resize_size", 300, "applies to data.name = imagefolder only", {"name": "mnist", "root": None}),
    ("interpolation", "nearest", "one of 'bilinear', 'bicubic' or null", {}),
    ("interpolation", "bicubic", "applies to data.name = imagefolder only", {"name": "svhn", "root": None}),
    ("mean", [0.5, 0.5], "a list of 1 or 3 numbers", {}),
    ("mean", [1.5], "in [0, 1]", {}),
    ("mean", [123.7, 116.3, 103.5], "in [0, 1] pixel units (ImageNet: mean [0.485", {}),
    ("mean", 0.5, "a list of a number or null", {}),
    ("mean", [0.5, "x", 0.5], "a list of a number or null", {}),
    ("std", [0.0], "[0.001, 1]", {}),
    ("std", [0.2, 0.2, 0.2], "as many values as data.mean (1)", {"mean": [0.5]}),
    ("loader", "disk", "one of 'auto', 'tensor', 'stream'", {}),
    ("loader", "stream", "stream applies to data.name = imagefolder only", {"name": "fashion_mnist", "root": None}),
    ("memory_budget_mb", 0, "[1, 1,048,576] MiB", {}),
    ("memory_budget_mb", 1 << 40, "[1, 1,048,576] MiB", {}),
    ("memory_budget_mb", 1.5, "an integer", {}),
    ("num_workers", -1, "[0, 64]", {}),
    ("num_workers", 65, "[0, 64]", {}),
    ("root", None, "data.name = imagefolder needs data.root", {}),
])
def test_bad_image_folder_params_name_key_value_and_rule(key, value, needle, extra):
    with pytest.raises(ParamsError) as e:
        params_from_dict(folder_raw(**{**extra, key: value}))
    msg = str(e.value)
    assert f"data.{key}" in msg and repr(value)[:20] in msg and needle in msg, msg


# ---- the prepare stage ----

def run_prepare(work: Path, root: Path, capsys, **data) -> tuple[int, str, str]:
    """``python -m stages.prepare`` in ``work``, in this process (a subprocess would spend most of its time
    importing torch): its exit code, stdout and stderr."""
    import yaml

    from stages import prepare as prepare_stage

    data = {"image_size": 16, "num_workers": 0, **data}
    (work / "params.yaml").write_text(yaml.safe_dump(folder_raw(root=str(root), **data)))
    capsys.readouterr()
    code = 0
    try:
        stage.run(prepare_stage.main)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prepare_stage_streams_an_image_folder_and_exits_2_naming_a_bad_file(tmp_path, rgb_folder, monkeypatch,
                                                                              capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_prepare(tmp_path, rgb_folder, capsys, loader="stream")
    assert code == 0, err
    assert "3 classes, train (36, 3, 16, 16) val (15, 3, 16, 16) (3 channels" in out and "stream path" in out, out
    d = stage.load_prepared(tmp_path / stage.PREPARED)
    assert d["loader"] == "stream" and d["classes"] == ["A_dog", "b_cat", "c"]
    bad = tiny_folder(tmp_path / "bad")
    (bad / "val" / "a" / "1.png").write_bytes(b"not a png")
    code, out, err = run_prepare(tmp_path, bad, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "val/a/1.png: not a readable image" in err, err


def test_prepare_stage_applies_data_mean_std_to_a_builtin_dataset(tmp_path, monkeypatch, capsys):
    from tests.helpers import write_fake_dataset

    raw_dir = write_fake_dataset(tmp_path / "raw", n_train=40, n_test=10)
    monkeypatch.chdir(tmp_path)
    builtin = {"name": "fashion_mnist", "image_size": None, "num_workers": None}
    code, out, err = run_prepare(tmp_path, raw_dir, capsys, **builtin, mean=[0.25], std=[0.5])
    assert code == 0, err
    d = stage.load_prepared(tmp_path / stage.PREPARED)
    assert (d["mean"], d["std"]) == ([0.25], [0.5]) and "normalising with data.mean/data.std" in out
    code, out, err = run_prepare(tmp_path, raw_dir, capsys, **builtin, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    assert code == 2 and err.strip() == ("error: params.yaml: data.mean = [0.5, 0.5, 0.5] is invalid: the prepared "
                                         "images have 1 channel, so it needs 1 value (or null: computed from the "
                                         "train split)")


def test_a_pretrained_teachers_own_preprocessing_is_the_default(tmp_path, monkeypatch, rgb_folder):
    """teacher.init: pretrained -> the weights' transforms (resnet18: resize 256, crop 224, ImageNet mean/std)
    unless a data.* key says otherwise; no download, the enum carries them."""
    import copy

    import stages.prepare
    from kdprune import stage

    p = copy.deepcopy(default_params())
    p["data"].update(name="imagefolder", root=str(rgb_folder), loader="tensor")
    p["model"].update(arch="torchvision", name="resnet18")
    p["teacher"].update(init="pretrained", epochs=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    stage.run(stages.prepare.main)
    out = torch.load(tmp_path / stage.PREPARED, weights_only=True)
    assert out["preprocessing"]["image_size"] == 224 and out["preprocessing"]["resize_size"] == 256
    assert out["mean"] == pytest.approx([0.485, 0.456, 0.406]) and out["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert tuple(out["train_x"].shape[1:]) == (3, 224, 224)
