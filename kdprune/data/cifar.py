"""CIFAR-10 and CIFAR-100: the python pickles, read with a restricted unpickler that builds numpy arrays only."""
from __future__ import annotations

import contextlib
import io as _stdio
import os
import pickle  # only through _RestrictedUnpickler, whose find_class refuses all but numpy arrays
import pickletools
from pathlib import Path

import numpy as np

from kdprune.data.limits import DatasetError, _check_count, _check_declared, _check_labels
from kdprune.data.registry import DatasetInfo, _joined_names
from kdprune.io import open_regular


try:  # numpy >= 2 (the originals, pickled under numpy 1, name numpy.core.multiarray; both map here)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


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
        fh, size = open_regular(path, "a CIFAR pickle", None, DatasetError)
        with fh:
            _check_declared(path, "the file", size)
            raw = fh.read(size)
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
