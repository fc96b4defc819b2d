"""SVHN: the ``.mat`` files, their declared shapes checked before ``scipy.io.loadmat`` reads them."""
from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from kdprune.data.limits import DatasetError, _DEFLATE_MAX_RATIO, _check_count, _check_declared
from kdprune.data.registry import DatasetInfo, _joined_names
from kdprune.io import open_regular


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
    from scipy.io.matlab import _mio5, matfile_version  # heavy optional, only for SVHN files; _mio5: the reader whosmat uses (scipy is pinned)

    fh, size = open_regular(path, "an SVHN .mat file", None, DatasetError)
    found = {}
    with fh:
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
    import scipy.io  # heavy optional: only for SVHN files

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
