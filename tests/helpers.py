"""Test helpers: the committed params, fake datasets in the real on-disk formats. Import them from here;
conftest.py keeps the fixtures."""
import copy
import io
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from kdprune.data import REGISTRY, write_idx  # noqa: E402


def committed_params_text(root: Path = ROOT) -> str:
    """``params.yaml`` as committed at HEAD (the working file only outside a git checkout).

    Tests start from these defaults, never from the working file: a user in the middle of an edit (a typo,
    an experiment's value left by ``dvc exp run -S``) must not see unrelated tests fail."""
    try:
        r = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        r = None
    if r is not None and r.returncode == 0:
        return r.stdout
    return (root / "params.yaml").read_text()


def default_params(root: Path = ROOT) -> dict:
    """The committed ``params.yaml`` as a dict (see :func:`committed_params_text`)."""
    return yaml.safe_load(committed_params_text(root))


def params_with(dotted: str, value, base: dict | None = None) -> dict:
    """A deep copy of the committed params (or ``base``) with one dotted key set: ``params_with("prune.ratio", 1.2)``."""
    raw = copy.deepcopy(default_params() if base is None else base)
    *path, last = dotted.split(".")
    node = raw
    for k in path:
        node = node[k]
    node[last] = value
    return raw


def make_fake_images(n: int, classes: int = 10, size: int = 28, seed: int = 0):
    """Learnable synthetic images: each class lights a different square, plus noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % classes).astype(np.uint8)
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 4)
        x[i, 2 + 6 * r: 8 + 6 * r, 2 + 6 * col: 8 + 6 * col] = 220
    return x, y


def write_fake_dataset(root: Path, n_train: int = 400, n_test: int = 100, gz: bool = True) -> Path:
    """The four Fashion-MNIST IDX files, in the real on-disk format, under ``root``."""
    write_fake_idx(root, n_train, n_test, gz)
    return root


def write_fake_idx(root: Path, n_train: int = 400, n_test: int = 100, gz: bool = True) -> dict:
    """The four IDX files of MNIST / Fashion-MNIST (same names, same format) in ``root``. Returns the arrays
    written: {"train": (x (N, 28, 28) uint8, y (N,)), "test": ...}."""
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    files = REGISTRY["fashion_mnist"].files
    written = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = make_fake_images(n, seed=seed)
        write_idx(root / f"{files[split + '_images']}{ext}", x)
        write_idx(root / f"{files[split + '_labels']}{ext}", y)
        written[split] = (x, y)
    return written


def make_fake_rgb(n: int, classes: int = 10, size: int = 32, seed: int = 0):
    """(N, 3, size, size) uint8 images: noise plus a bright square whose place and channel encode the class."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % classes).astype(np.int64)
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, 3, size, size), dtype=np.uint8)
    for i, c in enumerate(y):
        r, col = divmod(int(c) % 16, 4)
        x[i, int(c) // 16 % 3, 2 + 7 * r: 8 + 7 * r, 2 + 7 * col: 8 + 7 * col] = 220
    return x, y


class Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` the way Python 2 pickled its ``str`` (SHORT_BINSTRING / BINSTRING opcodes), as in the
    original CIFAR files, instead of Python 3's protocol-2 ``_codecs.encode(...)`` call."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump_cifar_pickle(path: Path, obj: dict, py2: bool = True) -> None:
    """Write ``obj`` (bytes keys, as the CIFAR dicts are read with encoding='bytes') at protocol 2. ``py2``:
    byte-for-byte in the style of the originals (Python 2 strings; numpy arrays under numpy 1's module
    name ``numpy.core.multiarray``); otherwise as Python 3's pickle writes it."""
    if py2:
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    else:
        data = pickle.dumps(obj, protocol=2)
    path.write_bytes(data)


def write_fake_cifar(root: Path, name: str = "cifar10", n_train: int = 100, n_test: int = 40, py2: bool = True,
                     class_names: list[str] | None = None) -> dict:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta`` in ``cifar-10-batches-py/``) or CIFAR-100
    (``train``, ``test``, ``meta`` in ``cifar-100-python/``) as torchvision lays them out under ``root``.
    Returns {"train": (x (N, 3, 32, 32), y), "test": ..., "classes": names, "dir": path}."""
    info = REGISTRY[name]
    d = root / info.subdirs[0]
    d.mkdir(parents=True, exist_ok=True)
    k = len(info.classes)
    names = list(class_names if class_names is not None else info.classes)
    written = {"classes": names, "dir": d}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = make_fake_rgb(n, classes=k, seed=seed)
        written[split] = (x, y)
        roles = [r for r in info.files if r == split or r.startswith(f"{split}_")]
        for role, xs, ys in zip(roles, np.array_split(x, len(roles)), np.array_split(y, len(roles))):
            batch = {b"batch_label": f"{role} batch".encode(), b"data": xs.reshape(len(xs), -1),
                     b"filenames": [f"img_{i}.png".encode() for i in range(len(xs))]}
            if name == "cifar10":
                batch[b"labels"] = [int(v) for v in ys]
            else:
                batch[b"fine_labels"] = [int(v) for v in ys]
                batch[b"coarse_labels"] = [int(v) // 5 for v in ys]
            dump_cifar_pickle(d / info.files[role], batch, py2)
    if name == "cifar10":
        meta = {b"label_names": [s.encode() for s in names], b"num_cases_per_batch": n_train // 5, b"num_vis": 3072}
    else:
        meta = {b"fine_label_names": [s.encode() for s in names],
                b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}
    dump_cifar_pickle(d / info.files["meta"], meta, py2)
    return written


def write_fake_svhn(root: Path, n_train: int = 60, n_test: int = 30, n_extra: int = 0) -> dict:
    """``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat`` when ``n_extra``) in SVHN's format:
    X uint8 (32, 32, 3, N), y uint8 (N, 1) with 10 for the digit 0. Returns the (N, 3, 32, 32) images and
    the digit labels (0..9) written."""
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1), ("extra", n_extra, 2)):
        if not n:
            continue
        x, y = make_fake_rgb(n, seed=seed)
        mat_y = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(root / REGISTRY["svhn"].files[split], {"X": x.transpose(2, 3, 1, 0), "y": mat_y})
        written[split] = (x, y)
    return written
