"""Datasets: raw on-disk formats -> uint8 tensors, and a tensor-resident batch loader.

``prepare`` converts a dataset once into ``data/prepared/dataset.pt``: uint8 images (N, C, H, W),
int64 labels and metadata. Training never touches a per-sample Dataset/DataLoader: the whole
split stays in memory as one tensor, and augmentation (random crop via padding + gather,
random horizontal flip where it is label-preserving) is done per batch with tensor ops.

Five datasets, each in the format torchvision downloads (``REGISTRY``):

- ``mnist``, ``fashion_mnist``: the four IDX files, gzipped or not, flat in a directory (the
  Debian package's ``/usr/share/datasets/fashion-mnist/``) or in torchvision's
  ``<root>/MNIST/raw/`` / ``<root>/FashionMNIST/raw/``. Where torchvision's own ``MNIST`` /
  ``FashionMNIST`` class can read them (its layout, uncompressed files: with ``download=False`` it
  only checks that they exist) they are read through it; the gzipped and flat layouts, which it
  cannot open, are read by ``read_idx``.
- ``cifar10``, ``cifar100``: the python pickles of ``cifar-10-batches-py/`` and
  ``cifar-100-python/``; ``svhn``: ``train_32x32.mat``, ``test_32x32.mat`` and, with
  ``data.svhn_extra``, ``extra_32x32.mat``. torchvision's CIFAR and SVHN classes refuse any file
  whose md5 differs from the published one (so every format-true test fixture is "corrupted" to
  them), hence these formats are read here directly: the pickles with ``_RestrictedUnpickler``,
  which only resolves the numpy globals an array needs (a pickle naming anything else, e.g.
  ``os.system``, is refused before it can run), and the ``.mat`` files with ``scipy.io.loadmat``,
  mapping SVHN's label 10 to digit 0 as torchvision does.

Hostile or corrupt files are refused, with a one-line ``DatasetError``, before they can cost memory:
every size a file declares (an IDX header, a pickled array, a .mat variable header) is checked, in
Python ints, against the file's own size, the published file's image count (``DatasetInfo.max_images``)
and ``MEMORY_BUDGET`` before anything is allocated, and compressed data is never decompressed past
its declared size. An empty split or a constant (zero-std) train split is refused too.

Search order (``locate_raw``): an explicit ``data.root`` only; otherwise the Debian package's
directory (Fashion-MNIST has one), then ``data/raw/``, then torchvision's downloader into
``data/raw/`` when ``data.download`` is true.
"""
from __future__ import annotations

import contextlib
import gzip
import io as _stdio
import math
import os
import pickle  # only through _RestrictedUnpickler, whose find_class refuses all but numpy arrays
import pickletools
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kdprune import io
from kdprune.params import resolves_inside

try:  # numpy >= 2 (the originals, pickled under numpy 1, name numpy.core.multiarray; both map here)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


class DatasetError(RuntimeError):
    """The dataset is missing, unreadable or not in the expected format."""


MEMORY_BUDGET = 2 * 1024 ** 3
"""The most bytes one raw array may declare: an IDX payload, a CIFAR pickle file, an SVHN .mat variable.

A few bytes of header can declare terabytes (an IDX shape, a .mat variable's dimensions, a gzip or
zlib bomb), so each declared size is checked against this before anything is allocated. The
largest real array is SVHN's extra_32x32.mat 'X' (531,131 x 3,072 bytes = 1.63 GB); 2 GiB admits it
and every other published file, and refuses what this pipeline could not hold anyway (the whole
prepared split lives in memory). Checked at call time, so tests can lower it."""

_DEFLATE_MAX_RATIO = 1032  # zlib/gzip: deflate expands at most 1032:1 (zlib.net/zlib_tech.html)
_CHUNK = 1 << 20  # incremental reads and decompression: 1 MiB at a time


def _check_declared(path: Path, what: str, nbytes: int, limit: int | None = None, why: str = "") -> None:
    """Refuse a declared size (Python ints) over the memory budget, or over ``limit`` (``why`` says what that is)."""
    if nbytes > MEMORY_BUDGET:
        raise DatasetError(f"{path}: {what} declares {nbytes:,} bytes, over the memory budget of {MEMORY_BUDGET:,} "
                           f"bytes (kdprune.data.MEMORY_BUDGET); the file is corrupted or hostile")
    if limit is not None and nbytes > limit:
        raise DatasetError(f"{path}: {what} declares {nbytes:,} bytes, more than {why} ({limit:,} bytes); the file "
                           f"is corrupted or hostile")


def _check_count(path: Path, n: int, limit: int) -> None:
    """Refuse a file that declares more images than the published one holds (the format's known limit)."""
    if n > limit:
        raise DatasetError(f"{path}: declares {n:,} images; the published file holds {limit:,}, so this one is "
                           f"corrupted or hostile")


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline knows about one dataset.

    ``mean``/``std`` are the published per-channel statistics of the full train split, kept for
    reference and as a check on the files (the prepare stage logs them next to the computed ones).
    Normalisation does NOT use them: ``prepare_dataset`` stores the exact mean/std of the prepared
    train split (after ``train_subset``), computed from train only, never from test.
    """
    name: str
    classes: tuple[str, ...]  # canonical names; CIFAR takes its names from the meta file
    channels: int
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # is a horizontal flip label-preserving? (not for digits)
    format: str  # "idx" | "cifar" | "svhn": which reader
    files: dict[str, str]  # role -> raw file name
    subdirs: tuple[str, ...]  # where the files may sit under a searched directory ("" = in it)
    torchvision_class: str  # torchvision.datasets class, for the downloader
    debian_package: str | None = None
    debian_dir: str | None = None
    optional: tuple[str, ...] = ()  # roles read only on request (svhn: extra)
    pickle_keys: tuple[str, str] | None = None  # cifar: (labels key in a batch, names key in meta)
    max_images: dict[str, int] | None = None  # role -> images in the published file: the most a file may declare


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_MAX_IMAGES = {"train_images": 60000, "train_labels": 60000, "test_images": 10000, "test_labels": 10000}
_DIGITS = tuple(str(i) for i in range(10))
_CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
worm""".split())

REGISTRY: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        channels=1, image_size=(28, 28), mean=(0.2860,), std=(0.3530,),
        hflip=True,
        format="idx", files=_IDX_FILES, subdirs=("", "FashionMNIST/raw"), torchvision_class="FashionMNIST",
        max_images=_IDX_MAX_IMAGES,
        debian_package="dataset-fashion-mnist",
        debian_dir="/usr/share/datasets/fashion-mnist",
    ),
    "mnist": DatasetInfo(
        name="mnist", classes=_DIGITS,
        channels=1, image_size=(28, 28), mean=(0.1307,), std=(0.3081,),
        hflip=False,
        format="idx", files=_IDX_FILES, subdirs=("", "MNIST/raw"), torchvision_class="MNIST",
        max_images=_IDX_MAX_IMAGES,
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        channels=3, image_size=(32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        hflip=True,
        format="cifar",
        files={**{f"train_{i}": f"data_batch_{i}" for i in range(1, 6)}, "test": "test_batch",
               "meta": "batches.meta"},
        subdirs=("cifar-10-batches-py", ""), torchvision_class="CIFAR10",
        pickle_keys=("labels", "label_names"),
        max_images={**{f"train_{i}": 10000 for i in range(1, 6)}, "test": 10000},
    ),
    "cifar100": DatasetInfo(
        name="cifar100", classes=_CIFAR100_CLASSES,
        channels=3, image_size=(32, 32), mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        hflip=True,
        format="cifar", files={"train": "train", "test": "test", "meta": "meta"},
        subdirs=("cifar-100-python", ""), torchvision_class="CIFAR100",
        pickle_keys=("fine_labels", "fine_label_names"), max_images={"train": 50000, "test": 10000},
    ),
    "svhn": DatasetInfo(
        name="svhn", classes=_DIGITS,
        channels=3, image_size=(32, 32), mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
        hflip=False,
        format="svhn", files={"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"},
        subdirs=("",), torchvision_class="SVHN", optional=("extra",),
        max_images={"train": 73257, "test": 26032, "extra": 531131},
    ),
}

# Datasets read from a directory tree of image files rather than from REGISTRY's fixed files: kdprune/imagefolder.py
# (stages/prepare.py dispatches to it). REGISTRY + FOLDER_DATASETS = kdprune.params.DATASETS.
FOLDER_DATASETS = ("imagefolder",)

# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@contextlib.contextmanager
def _open_idx(path: Path, max_len: int | None = None) -> Iterator[tuple[object, tuple[int, ...], np.dtype]]:
    """Open an IDX file (gzipped if its name ends in .gz) and check its header before anything is allocated:
    yields (file positioned at the payload, shape, dtype). The declared size, in Python ints (``np.prod``
    would wrap: 65536^4 is 0 in int64), must fit ``MEMORY_BUDGET`` and the file: equal to the payload
    uncompressed, at most what deflate can expand the file to gzipped. ``max_len``: the most items (first
    dimension) it may declare. Read errors anywhere in the ``with`` body become a ``DatasetError``."""
    compressed = path.suffix == ".gz"
    try:
        size = path.stat().st_size
        with (gzip.open if compressed else open)(path, "rb") as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise DatasetError(f"{path}: not an IDX file (bad magic number)")
            code, ndim = head[2], head[3]
            if code not in _IDX_DTYPES:
                raise DatasetError(f"{path}: unknown IDX element type 0x{code:02x}")
            dims = fh.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DatasetError(f"{path}: truncated IDX header")
            shape = struct.unpack(f">{ndim}I", dims)
            dtype = np.dtype(_IDX_DTYPES[code])
            header, nbytes = 4 + 4 * ndim, math.prod(shape) * dtype.itemsize
            if max_len is not None and ndim:
                _check_count(path, shape[0], max_len)
            if compressed:
                _check_declared(path, f"the IDX header (shape {shape})", header + nbytes, _DEFLATE_MAX_RATIO * size,
                                f"a gzip file of {size:,} bytes can expand to (deflate: at most {_DEFLATE_MAX_RATIO}:1)")
            else:
                _check_declared(path, f"the IDX header (shape {shape})", nbytes)
                if header + nbytes != size:
                    raise DatasetError(
                        f"{path}: IDX payload is {size - header} bytes but the header declares shape {shape} "
                        f"({nbytes} bytes); the file is truncated or corrupted")
            yield fh, shape, dtype
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({e}); the file is corrupted or truncated") from None


def read_idx(path: str | os.PathLike, max_len: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array of its declared shape.

    The header is checked first (``_open_idx``); the payload is then read, and decompressed,
    incrementally into an array of the declared size and never past it: a gzip bomb stops there."""
    path = Path(path)
    with _open_idx(path, max_len) as (fh, shape, dtype):
        nbytes = math.prod(shape) * dtype.itemsize
        buf = np.empty(nbytes, np.uint8)
        view, got = memoryview(buf), 0
        while got < nbytes and (n := fh.readinto(view[got:got + _CHUNK])):
            got += n
        longer = bool(fh.read(1))
    if got < nbytes or longer:
        raise DatasetError(
            f"{path}: IDX payload is {f'more than {nbytes}' if longer else got} bytes but the header declares "
            f"shape {shape} ({nbytes} bytes); the file is truncated or corrupted")
    return buf.view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` in IDX format (gzip if the name ends in .gz). Used to make test fixtures."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    code = codes[array.dtype.newbyteorder("=")]
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(_IDX_DTYPES[code]).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(payload)


_FORMAT_WORDS = {"idx": "IDX", "cifar": "CIFAR python pickle", "svhn": "SVHN .mat"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches and nothing else: dicts, lists, strings, numbers and numpy arrays.

    ``find_class`` resolves only the globals a pickled numpy array needs (``_reconstruct`` under
    its numpy 1 and numpy 2 module names, ``ndarray``, ``dtype``) and ``_codecs.encode``, which is
    how Python 3 writes ``bytes`` at protocol 2, narrowed to latin-1 text. Any other global (the way
    a malicious pickle reaches ``os.system``) raises ``DatasetError`` naming the file.

    Even the numpy globals are narrowed to the one way numpy pickles an array:
    ``_reconstruct(ndarray, (0,), b'b')`` makes an empty array and ``__setstate__`` fills it from bytes
    in the file, whose length numpy checks against the shape. Anything else could allocate or fake
    memory the file does not hold: ``_reconstruct`` with a large shape allocates it, and
    ``ndarray(shape, dtype, buffer, offset, strides)`` with zero strides turns one byte into gigabytes.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
        ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
        ("numpy", "ndarray"): "_ndarray",
        ("numpy", "dtype"): "_dtype",
        ("_codecs", "encode"): "_latin1_encode",
    }

    def __init__(self, fh, path: Path):
        super().__init__(fh, encoding="latin1")  # the originals were pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return getattr(self, self._ALLOWED[module, name])
        raise DatasetError(
            f"{self.path}: refusing to unpickle the global '{module}.{name}': a CIFAR batch holds only "
            f"dicts, lists, strings and numpy arrays (this file is not one, or was tampered with)")

    _dtype = staticmethod(np.dtype)

    def _ndarray(self, *args, **kwargs):
        """What the pickle gets for ``numpy.ndarray``: a token for ``_reconstruct``'s first argument, not callable."""
        raise DatasetError(f"{self.path}: refusing numpy.ndarray(...) called from a pickle: with a buffer and strides "
                           f"it declares an array the file does not hold (numpy pickles arrays with _reconstruct)")

    def _reconstruct(self, subtype, shape, dtype):
        if subtype != self._ndarray or shape != (0,) or dtype not in (b"b", "b"):
            raise DatasetError(f"{self.path}: refusing numpy _reconstruct with other arguments than numpy's own "
                               f"(ndarray, (0,), b'b'): it would allocate an array the file does not hold")
        return _np_reconstruct(np.ndarray, (0,), b"b")

    def _latin1_encode(self, text, encoding="utf-8"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise DatasetError(f"{self.path}: refusing _codecs.encode({type(text).__name__}, {encoding!r}) "
                               f"in a pickle; only latin-1 text is expected")
        return text.encode("latin1")


def _check_pickle_opcodes(raw: bytes, path: Path) -> None:
    """Walk the pickle's opcodes without running them (``pickletools.genops`` also checks that each length
    prefix fits the file). The C unpickler grows its memo table to twice the largest memo index it is
    given, 8 bytes a slot: a 10-byte pickle can ask for 32 GB. A pickler numbers memo entries 0, 1, 2, ...,
    so an index is never more than the number of opcodes before it; that bounds the table by the file."""
    for n, (op, arg, _) in enumerate(pickletools.genops(raw)):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > n:
            raise DatasetError(f"{path}: refusing a pickle memo index of {arg:,} at opcode {n:,}: it would allocate "
                               f"a memo table of {16 * arg:,} bytes")


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, object]:
    """One CIFAR python pickle -> dict with ``str`` keys (the Python 2 originals give ``str``, a Python 3
    re-pickle gives ``bytes``; both are accepted). Only numpy arrays and plain data are unpickled, from a
    file no larger than ``MEMORY_BUDGET`` whose opcodes were checked first (``_check_pickle_opcodes``)."""
    path = Path(path)
    try:
        _check_declared(path, "the file", path.stat().st_size)
        raw = path.read_bytes()
        _check_pickle_opcodes(raw, path)
        obj = _RestrictedUnpickler(_stdio.BytesIO(raw), path).load()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in any of a dozen ways, all meaning the same
        raise DatasetError(f"{path}: not a readable CIFAR python pickle ({type(e).__name__}: {e}); "
                           f"the file is corrupted or truncated") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: a CIFAR pickle holds a dict, this one holds a {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _keys(d: dict) -> list[str]:
    """A dict's keys for an error message: only string keys are shown (``str`` of a nested tuple from a pickle
    can be exponentially long: each level may hold the one below twice)."""
    return sorted(k if isinstance(k, str) else f"<{type(k).__name__}>" for k in d)


def _text(v) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _read_cifar(info: DatasetInfo, files: dict[str, Path], extra: bool) -> dict:
    labels_key, names_key = info.pickle_keys
    meta = read_cifar_pickle(files["meta"])
    names = meta.get(names_key)
    if not isinstance(names, list) or len(names) != len(info.classes) \
            or not all(isinstance(n, str | bytes) for n in names):
        raise DatasetError(
            f"{files['meta']}: expected '{names_key}', a list of {len(info.classes)} class names, got "
            f"{type(names).__name__ if not isinstance(names, list) else f'{len(names)} items'} "
            f"(keys: {_keys(meta)})")
    out = {"classes": [_text(n) for n in names]}
    h, w = info.image_size
    for split in ("train", "test"):
        roles = [r for r in info.files if r == split or r.startswith(f"{split}_")]
        xs, ys = [], []
        for role in roles:
            path = files[role]
            batch = read_cifar_pickle(path)
            data, labels = batch.get("data"), batch.get(labels_key)
            if data is None or labels is None:
                raise DatasetError(f"{path}: a CIFAR batch needs 'data' and '{labels_key}', it has {_keys(batch)}")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                    or data.shape[1] != info.channels * h * w or not data.flags.c_contiguous:
                raise DatasetError(f"{path}: 'data' must be a contiguous uint8 array (N, {info.channels * h * w}), "
                                   f"got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
            _check_count(path, len(data), info.max_images[role])
            xs.append(data.reshape(-1, info.channels, h, w))  # rows are R(1024) G(1024) B(1024), row-major
            ys.append(_int_labels(labels, len(data), path, labels_key))
            _check_labels(ys[-1], len(info.classes), path)
        out[split] = (np.concatenate(xs), np.concatenate(ys), _joined_names(files, roles))
    return out


def _int_labels(labels, n: int, path: Path, key: str) -> np.ndarray:
    """Pickled labels -> int64 (n,). Only a list of n ints or an integer array (n,) is converted: np.asarray
    of nested lists from a pickle could expand exponentially (each level may hold the one below twice)."""
    if isinstance(labels, list) and len(labels) == n and all(isinstance(v, int) for v in labels) \
            or isinstance(labels, np.ndarray) and labels.shape == (n,) and np.issubdtype(labels.dtype, np.integer):
        with contextlib.suppress(OverflowError):  # a Python int beyond int64
            return np.asarray(labels, dtype=np.int64)
    got = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else \
        f"a list of {len(labels)} items" if isinstance(labels, list) else type(labels).__name__
    raise DatasetError(f"{path}: '{key}' must be {n} integers, one per image, got {got}")


# MATLAB 5 numeric classes (mxCLASS) -> (name, bytes per element), and stored data types (miINT8..miUINT64) -> bytes
_MAT_CLASSES = {6: ("double", 8), 7: ("single", 4), 8: ("int8", 1), 9: ("uint8", 1), 10: ("int16", 2),
                11: ("uint16", 2), 12: ("int32", 4), 13: ("uint32", 4), 14: ("int64", 8), 15: ("uint64", 8)}
_MAT_STORED = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}


def _mat_is_complex(fh, start: int, end: int, byte_order: str) -> bool:
    """The complex flag of the .mat variable at ``start`` (scipy's header does not expose it; a complex
    variable has a second, imaginary, data element). Its array flags follow the miMATRIX tag, inside the
    zlib stream if the variable is compressed (miCOMPRESSED, 15): only those bytes are decompressed."""
    here = fh.tell()
    fh.seek(start)
    head = fh.read(min(end - start, 4096))  # ample for a zlib header and its first Huffman tables
    fh.seek(here)
    if struct.unpack(f"{byte_order}I", head[:4])[0] == 15:
        head = zlib.decompressobj().decompress(head[8:], 24)
    return len(head) < 24 or bool(struct.unpack(f"{byte_order}I", head[16:20])[0] & 0x0800)


def _mat_variables(path: Path, names: tuple[str, ...] = ("X", "y")) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (dims, class) of the variables ``names`` in a MATLAB 5 .mat file, read from their headers
    as ``scipy.io.whosmat`` reads them. (scipy inflates a compressed variable 128 KiB of input at a time,
    so reading a header may inflate up to ~135 MB, whatever the file declares: bounded, and loadmat does
    the same.)

    ``loadmat`` allocates what a variable's data element declares and decompresses that much, whatever the
    dimensions say (then uses a prefix of it), so each variable's data element is checked too: it must hold
    exactly its dimensions' bytes, which must fit ``MEMORY_BUDGET`` and what its bytes in the file can
    expand to. Only real numeric variables are accepted (a cell or struct hides further allocations)."""
    from scipy.io.matlab import _mio5, matfile_version  # _mio5: the reader whosmat uses (scipy is pinned)

    size, found = path.stat().st_size, {}
    with open(path, "rb") as fh:
        if (version := matfile_version(fh)) != (1, 0):
            raise DatasetError(f"{path}: a MATLAB 5 .mat file (SVHN's format) is expected, this one is version "
                               f"{version}")
        fh.seek(0)
        reader = _mio5.MatFile5Reader(fh)
        reader.initialize_read()
        reader.read_file_header()
        while not reader.end_of_stream():
            start = fh.tell()
            header, next_pos = reader.read_var_header()
            name = (header.name or b"").decode("latin1")
            if next_pos > size:
                raise DatasetError(f"{path}: variable '{name}' runs past the end of the file; it is truncated")
            if name in names:
                dims = tuple(int(d) for d in header.dims)
                cls, itemsize = _MAT_CLASSES.get(header.mclass, (_mio5.mclass_info.get(header.mclass, "unknown"), 0))
                if name in found or not itemsize or _mat_is_complex(fh, start, next_pos, reader.byte_order):
                    raise DatasetError(f"{path}: '{name}' must be one real numeric matrix, got "
                                       f"{'a second one' if name in found else f'{cls} {dims}'}")
                mdtype, nbytes = reader._matrix_reader.read_full_tag()
                if mdtype >> 16:  # a small data element: (bytes << 16 | type) and the data in one 8-byte tag
                    mdtype, nbytes = mdtype & 0xFFFF, mdtype >> 16
                if nbytes != math.prod(dims) * _MAT_STORED.get(mdtype, -1):
                    raise DatasetError(f"{path}: '{name}' is {cls} {dims} but its data element declares {nbytes:,} "
                                       f"bytes of type {mdtype}; the file is corrupted or hostile")
                _check_declared(path, f"'{name}' ({cls} {dims})", max(nbytes, math.prod(dims) * itemsize),
                                _DEFLATE_MAX_RATIO * (next_pos - start),
                                f"its {next_pos - start:,} bytes in the file can expand to")
                found[name] = (dims, cls)
            fh.seek(next_pos)
    return found


def read_svhn_mat(path: str | os.PathLike, max_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN ``*_32x32.mat`` -> images uint8 (N, 3, 32, 32) and labels int64 in [0, 10).

    The file stores X as (32, 32, 3, N) and labels 1..10 with 10 for the digit 0; like torchvision,
    10 becomes 0. The variables' headers are checked before anything is loaded (``_mat_variables``):
    X (32, 32, 3, N) uint8, y (N, 1), N at most ``max_images``."""
    import scipy.io

    path = Path(path)
    try:
        declared = _mat_variables(path)
        missing = [k for k in ("X", "y") if k not in declared]
        if missing:
            raise DatasetError(f"{path}: an SVHN .mat file holds the variables 'X' and 'y'; this one lacks {missing}")
        (x_dims, x_cls), (y_dims, y_cls) = declared["X"], declared["y"]
        if x_cls != "uint8" or len(x_dims) != 4 or x_dims[:3] != (32, 32, 3):
            raise DatasetError(f"{path}: 'X' must be uint8 (32, 32, 3, N), got {x_cls} {x_dims}")
        if max_images is not None:
            _check_count(path, x_dims[3], max_images)
        if y_dims != (x_dims[3], 1):
            raise DatasetError(f"{path}: 'y' must be {x_dims[3]} integer labels (N, 1), got {y_cls} {y_dims}")
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - scipy's parser raises IndexError, ValueError, MatReadError, ...
        raise DatasetError(f"{path}: not a readable MATLAB .mat file ({type(e).__name__}: {e}); "
                           f"the file is corrupted or truncated") from None
    x, y = mat["X"], mat["y"][:, 0]
    if x.dtype != np.uint8 or not np.issubdtype(y.dtype, np.integer):  # loadmat returns the stored types
        raise DatasetError(f"{path}: 'X' must be stored as uint8 and 'y' as integers, got {x.dtype} and {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise DatasetError(f"{path}: labels outside [0, 10] (SVHN writes 1..10, 10 for the digit 0): "
                           f"found {int(y.min())}..{int(y.max())}")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y


def _read_svhn(info: DatasetInfo, files: dict[str, Path], extra: bool) -> dict:
    out = {}
    for split, roles in (("train", ["train", "extra"] if extra else ["train"]), ("test", ["test"])):
        parts = [read_svhn_mat(files[r], info.max_images[r]) for r in roles]
        x = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        y = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
        out[split] = (x, y, _joined_names(files, roles))
    return out


def _torchvision_idx_root(info: DatasetInfo, files: dict[str, Path]) -> Path | None:
    """The root torchvision's MNIST/FashionMNIST class reads ``files`` from, if it can read them at all:
    its ``<root>/<Class>/raw/`` layout, uncompressed (it checks only that those names exist)."""
    tv_raw = Path(info.torchvision_class) / "raw"
    parents = {p.parent for p in files.values()}
    if len(parents) != 1 or any(p.suffix == ".gz" for p in files.values()):
        return None
    (parent,) = parents
    return parent.parent.parent if parent.parts[-2:] == tv_raw.parts else None


def _read_idx_split(info: DatasetInfo, files: dict[str, Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    roles = (f"{split}_images", f"{split}_labels")
    tv_root = _torchvision_idx_root(info, files)
    if tv_root is not None:
        import torchvision

        for role in roles:  # torchvision reads whole files and checks their sizes with np.prod (which wraps)
            with _open_idx(files[role], info.max_images[role]):
                pass
        cls = getattr(torchvision.datasets, info.torchvision_class)
        try:
            ds = cls(str(tv_root), train=split == "train", download=False)
            return ds.data.numpy(), ds.targets.numpy()
        except Exception as e:  # noqa: BLE001 - torchvision asserts; read_idx below says what is wrong
            for role in roles:
                read_idx(files[role], info.max_images[role])
            raise DatasetError(f"{files[roles[0]].parent}: torchvision.datasets.{info.torchvision_class} cannot read "
                               f"the {split} files ({type(e).__name__}: {e})") from None
    images, labels = (read_idx(files[role], info.max_images[role]) for role in roles)
    return images, labels


def _read_idx(info: DatasetInfo, files: dict[str, Path], extra: bool) -> dict:
    out = {}
    for split in ("train", "test"):
        images, labels = _read_idx_split(info, files, split)
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{images_path}: expected images (N, H, W) and labels (N,), got {images.shape} and {labels.shape}")
        if images.dtype != np.uint8:
            raise DatasetError(f"{images_path}: expected uint8 pixels, got {images.dtype}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f"{labels_path}: expected integer labels, got {labels.dtype}")
        labels = labels.astype(np.int64)
        _check_labels(labels, len(info.classes), labels_path)
        # the file name, not its path: the same bytes read from another directory give the same output hash
        out[split] = (images[:, None], labels, images_path.name)
    return out


_READERS = {"idx": _read_idx, "cifar": _read_cifar, "svhn": _read_svhn}


def _check_labels(labels: np.ndarray, n_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DatasetError(f"{path}: labels outside [0, {n_classes}): found {int(labels.min())}..{int(labels.max())}")


def _joined_names(files: dict[str, Path], roles: list[str]) -> str:
    """File names only (not paths): the same bytes read from another directory give the same output hash."""
    return "+".join(files[r].name for r in roles)


def _roles(info: DatasetInfo, extra: bool) -> list[str]:
    return [r for r in info.files if r not in info.optional or (extra and r == "extra")]


def _find(d: Path, info: DatasetInfo, roles: list[str]) -> tuple[dict[str, Path], Path]:
    """The files for ``roles`` in the first of ``info.subdirs`` under ``d`` that holds all of them; if none
    does, the most complete partial match (for the error message)."""
    best: tuple[dict[str, Path], Path] = ({}, d / info.subdirs[0])
    for sub in info.subdirs:
        base = d / sub if sub else d
        found = {}
        for role in roles:
            name = info.files[role]
            for cand in (base / name, base / f"{name}.gz") if info.format == "idx" else (base / name,):
                if cand.is_file():
                    found[role] = cand
                    break
        if len(found) == len(roles):
            return found, base
        if len(found) > len(best[0]):
            best = (found, base)
    return best


def _expected(info: DatasetInfo, roles: list[str]) -> str:
    gz = " (optionally .gz)" if info.format == "idx" else ""
    return f"the {_FORMAT_WORDS[info.format]} files {sorted(info.files[r] for r in roles)}{gz}"


def _where(info: DatasetInfo) -> str:
    return " or ".join("in it" if not s else f"in {s}/ under it" for s in info.subdirs)


def _partial(info: DatasetInfo, roles: list[str], found: dict[str, Path], base: Path) -> str:
    if not found:
        return ""
    return f" ({base} holds some of them but lacks {sorted(info.files[r] for r in roles if r not in found)})"


def locate_raw(name: str, root: str | None, download: bool, download_dir: Path = Path("data/raw"),
               svhn_extra: bool = False) -> dict[str, Path]:
    """Search order: ``data.root``, the Debian package's directory, ``download_dir``, then torchvision's
    downloader into ``download_dir``. Returns role -> file path."""
    info = REGISTRY[name]
    roles = _roles(info, svhn_extra)
    if root:  # an explicit data.root is authoritative: never fall back silently to another copy
        root_path = Path(root)
        if not root_path.is_dir():
            raise DatasetError(f"data.root = {root!r}: directory not found")
        found, base = _find(root_path, info, roles)
        if len(found) == len(roles):
            return found
        if resolves_inside(root_path):
            present = sorted(p.name for p in root_path.iterdir())
            holds = f", but it holds {present[:8]}{' ...' if len(present) > 8 else ''}"
        else:  # an error message must not list a directory outside the repository
            holds = " (its contents are not listed: it is outside the repository)"
        raise DatasetError(
            f"data.root = {root!r} is not a '{name}' dataset directory: expected {_expected(info, roles)} "
            f"{_where(info)}{holds}{_partial(info, roles, found, base)}")
    tried = []
    candidates = []
    if info.debian_dir:
        candidates.append(Path(info.debian_dir))
    candidates.append(download_dir)
    partial = ""
    for cand in candidates:
        tried.append(str(cand))
        if cand.is_dir():
            found, base = _find(cand, info, roles)
            if len(found) == len(roles):
                return found
            partial = partial or _partial(info, roles, found, base)
    if download:
        try:
            _torchvision_download(name, download_dir, svhn_extra)
        except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP errors all end the same way
            tried.append(f"download to {download_dir} (failed: {type(e).__name__}: {str(e)[:200]})")
        else:
            found, base = _find(download_dir, info, roles)
            if len(found) == len(roles):
                return found
            tried.append(f"download to {download_dir} (finished, but the files are not there)")
    else:
        tried.append("no download (data.download is false)")
    hint = f" Offline, copy them into {download_dir}/"
    if info.debian_package:
        hint = f" Offline, install it with: sudo apt-get update && sudo apt-get install -y {info.debian_package},"
    subdirs = [f"{s}/" for s in info.subdirs if s]
    where = f"in a directory or in its {' or '.join(subdirs)}" if subdirs else "in one directory"
    raise DatasetError(
        f"dataset '{name}' not found. Looked in: {tried}. Expected {_expected(info, roles)} {where}{partial}."
        f"{hint} or set data.root to a directory holding them.")


def _torchvision_download(name: str, download_dir: Path, svhn_extra: bool = False) -> None:
    """torchvision's downloader (needs internet; verifies the published md5s) into torchvision's layout."""
    import torchvision

    info = REGISTRY[name]
    cls = getattr(torchvision.datasets, info.torchvision_class)
    if info.format == "idx":
        for train in (True, False):
            cls(str(download_dir), train=train, download=True)
    elif info.format == "cifar":  # one archive holds both splits; loading the test split is the cheap check
        cls(str(download_dir), train=False, download=True)
    else:  # svhn: fetch the .mat files without loading them (extra alone is 1.3 GB)
        from torchvision.datasets.utils import download_url

        for split in _roles(info, svhn_extra):
            url, filename, md5 = cls.split_list[split]
            download_url(url, str(download_dir), filename, md5)


def _stratified_subset(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``n`` samples with classes as balanced as the data allows, in a seeded order."""
    if n <= 0 or n >= len(labels):
        return torch.arange(len(labels))
    perm = torch.randperm(len(labels), generator=generator)
    classes = labels.unique()
    per_class = [perm[labels[perm] == c] for c in classes]
    # round-robin over classes keeps the subset balanced
    picked = []
    i = 0
    while len(picked) < n:
        for idx in per_class:
            if i < len(idx) and len(picked) < n:
                picked.append(int(idx[i]))
        i += 1
    return torch.tensor(sorted(picked))


def channel_stats(x: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images (N, C, H, W), in [0, 1] units.

    Exact: from a per-channel histogram of the 256 pixel values (integer counts over chunks of
    images), with one rounding at the end, to float32, the precision the values had when they came
    from a float32 reduction. Needs no float copy of the split, which for SVHN with extra would be 7 GB."""
    n = x.shape[0] * x.shape[2] * x.shape[3]
    hist = torch.zeros(x.shape[1], 256, dtype=torch.int64)
    for i in range(0, len(x), chunk):
        for c in range(x.shape[1]):
            hist[c] += torch.bincount(x[i:i + chunk, c].reshape(-1), minlength=256)
    mean, std = [], []
    for counts in hist.tolist():
        s = sum(k * v for v, k in enumerate(counts))  # Python ints: no overflow, no rounding
        ss = sum(k * v * v for v, k in enumerate(counts))
        mean.append(s / (n * 255))  # int / int is correctly rounded
        std.append(((n * ss - s * s) / (n * (n - 1) * 255 ** 2)) ** 0.5 if n > 1 else 0.0)
    return _as_float32(mean), _as_float32(std)


def _as_float32(values: list[float]) -> list[float]:
    return torch.tensor(values, dtype=torch.float64).float().tolist()


def prepare_dataset(name: str, root: str | None, download: bool, train_subset: int, test_subset: int,
                    seed: int, svhn_extra: bool = False) -> dict:
    """Raw files of dataset ``name`` -> the prepared dict: uint8 ``train_x``/``test_x`` (N, C, H, W), int64
    labels, class names, the hflip flag and the normalisation ``mean``/``std``.

    Normalisation uses the statistics of the prepared train split (after ``train_subset``), computed
    exactly from train only, not the registry's published values: the model sees inputs standardised
    on the data it is trained on, subsets included, and the test split never feeds anything but the
    final accuracy."""
    if name not in REGISTRY:
        raise DatasetError(f"data.name = {name!r}: unknown dataset; known: {sorted(REGISTRY)}")
    info = REGISTRY[name]
    if svhn_extra and info.format != "svhn":
        raise DatasetError(f"data.svhn_extra = true applies to data.name = svhn only, not {name!r}")
    files = locate_raw(name, root, download, svhn_extra=svhn_extra)
    raw = _READERS[info.format](info, files, svhn_extra)
    out: dict = {"name": name, "classes": raw.get("classes", list(info.classes)), "hflip": info.hflip, "source": {}}
    g = torch.Generator().manual_seed(seed)
    where = {}
    for split, subset in (("train", train_subset), ("test", test_subset)):
        images, labels, source = raw[split]
        where[split] = f"{', '.join(str(p) for p in files.values() if p.name in source.split('+'))} " \
                       f"({split} split{f', data.{split}_subset = {subset}' if subset else ''})"
        if images.shape[1:] != (info.channels, *info.image_size):
            raise DatasetError(f"{source}: '{name}' images are {(info.channels, *info.image_size)} (C, H, W), "
                               f"these are {tuple(images.shape[1:])}")
        x = torch.from_numpy(images if images.flags.writeable else images.copy())
        y = torch.from_numpy(labels)
        idx = _stratified_subset(y, subset, g)
        out[f"{split}_x"], out[f"{split}_y"] = x[idx].contiguous(), y[idx].contiguous()
        out["source"][split] = source
        if not len(idx):  # an empty train split divides by zero in its statistics; an empty test split scores 0
            raise DatasetError(f"{where[split]}: holds no images; '{name}' needs at least one train and one test image")
    out["mean"], out["std"] = channel_stats(out["train_x"])
    for c, (m, s) in enumerate(zip(out["mean"], out["std"])):
        if not (math.isfinite(m) and math.isfinite(s) and s > 0):
            raise DatasetError(
                f"{where['train']}: channel {c} has mean {m} and std {s}: "
                f"{'every pixel has the same value, so normalising divides by zero' if s == 0 else 'not finite'} "
                f"(training would diverge to NaN); the files are corrupted or not '{name}' images")
    return out


def load_prepared(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        d = io.torch_load(path)
    except io.CheckpointError as e:
        raise DatasetError(f"{e} (run `dvc repro prepare` to rebuild it)") from None
    for key in ("train_x", "train_y", "test_x", "test_y", "mean", "std", "classes"):
        if key not in d:
            raise DatasetError(f"{path}: prepared dataset lacks '{key}'; rebuild it with `dvc repro prepare`")
    return d


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
