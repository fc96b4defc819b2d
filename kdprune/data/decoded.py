"""The decoded array of the stream path: every image of a split decoded once, at prepare, into one uint8 file
(N, C, S, S) on disk, which training reads batches from (``kdprune.data.streaming``). No epoch decodes an image.

Where it lives: ``data/decoded/`` under the repository (``DVC_ROOT`` when DVC runs us, so that queued and
``--temp`` experiments share the main repository's arrays; else the working directory), or ``$KDPRUNE_DECODED_DIR``.
It is a keyed cache outside DVC, not a DVC output: it is as large as the decoded set (ImageNet at 224 px:
193 GB), which DVC would hash after every prepare and copy into its cache, and it is derived from
``data.root``, which DVC does not track either. ``data/prepared/dataset.pt`` (the DVC output) records each
split's key, shape and the sha256 of its pixels; the array can be deleted at any time and is rebuilt, from the
same files, by the next prepare or by the first loader that misses it.

File: ``<split>-<key>.u8``, a ``HEADER_BYTES`` header (magic, version, N, C, H, W, the key, the source stamp,
the payload's sha256) and then the N images, C-contiguous. The key (sha256) covers everything that decides the
bytes: ``data.root`` resolved, the file list (names, sizes), and the preprocessing (resize, crop,
interpolation, channels). The source stamp covers what may change without changing them: the files' mtimes
and PIL's version; a stamp that differs rebuilds the array in place, and, when the pixels come out the same,
``dataset.pt`` stays byte-identical (DVC reruns nothing downstream).

Trust: an array is written to a temp file next to it, preallocated, fsynced, then renamed (``kdprune.io
.atomic_path``), under an exclusive ``flock`` on ``<name>.lock`` (two experiments, or DDP ranks, building the
same key: one builds, the others then open it); a killed build leaves only a temp file, never read, removed by
the next build. Before writing anything, the free space of the directory is checked against the size. Opening
checks the header (magic, version, a sane shape), the exact file size, the key, the shape and the sha256 that
prepare recorded, each refusal one ``DatasetError`` line naming the file; prepare, when it reuses an array,
also reads it whole and checks its pixels against the header's sha256. Training does not re-hash the pixels.

Reads are ``os.preadv`` at offsets, not an ``mmap``: the kernel's page cache serves them as it would a memory
map's pages, but the process holds only the batch it reads (its RSS does not grow with the pages it touched),
and a file truncated under a running job gives a short read, an error line, where a memory map gives SIGBUS.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from kdprune import io
from kdprune.data.decode import show_path
from kdprune.data.limits import DatasetError
from kdprune.data.workers import FileIndex, batches_for, decoded_chunks

ENV_DIR = "KDPRUNE_DECODED_DIR"
MAGIC = b"KDPRUNE-DECODED\n"  # 16 bytes
VERSION = 1
HEADER = struct.Struct("<16sIQIII32s32s32s")  # magic, version, N, C, H, W, key, stamp, sha256 of the payload
HEADER_BYTES = 4096  # the payload starts on a page boundary
MAX_IMAGES = 20_000_000  # = kdprune.data.imagefolder.MAX_FILES
MAX_SIDE = 1024  # = kdprune.params MAX_IMAGE_SIZE
KEEP_FREE = 1 << 30  # bytes left free on the disk after an array is written
READ_CHUNK = 64 << 20  # bytes per read when an array is verified


def default_dir(environ: dict | None = None) -> Path:
    """Where the arrays live: ``$KDPRUNE_DECODED_DIR``, else ``data/decoded`` under ``DVC_ROOT`` or the cwd."""
    env = os.environ if environ is None else environ
    if env.get(ENV_DIR):
        return Path(env[ENV_DIR])
    return Path(env.get("DVC_ROOT") or os.getcwd()) / "data" / "decoded"


@dataclass(frozen=True)
class Spec:
    """What ``dataset.pt`` records of one split's array."""
    split: str
    key: str  # 64 hex digits
    shape: tuple[int, int, int, int]  # N, C, H, W
    sha256: str | None  # of the payload; None before it is built

    def to_dict(self) -> dict:
        return {"key": self.key, "shape": list(self.shape), "sha256": self.sha256}

    @classmethod
    def from_dict(cls, split: str, d: dict) -> Spec:
        return cls(split, str(d["key"]), tuple(int(v) for v in d["shape"]), d.get("sha256"))

    @property
    def name(self) -> str:
        return f"{self.split}-{self.key}.u8"

    @property
    def nbytes(self) -> int:
        n, c, h, w = self.shape
        return HEADER_BYTES + n * c * h * w


def digest(*parts) -> str:
    """sha256 over ``parts`` (bytes, numpy arrays, or anything ``repr`` spells unambiguously)."""
    h = hashlib.sha256()
    for p in parts:
        b = p.tobytes() if isinstance(p, np.ndarray) else p if isinstance(p, bytes) else repr(p).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class DecodedArray:
    """An opened, checked array: ``read(rows)`` gives the images at ``rows`` (numpy int64) as (n, C, H, W)."""

    def __init__(self, path: Path, spec: Spec):
        self.path, self.spec, self.shape = path, spec, spec.shape
        self.record = int(np.prod(spec.shape[1:]))
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    def _pread(self, buf: np.ndarray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):  # Linux returns at most 2 GiB per call
            try:
                k = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise DatasetError(f"{show_path(self.path)}: cannot read the decoded images ({e.strerror or e})") \
                    from None
            if k == 0:
                raise DatasetError(f"{show_path(self.path)}: ends at byte {offset + done:,}, inside its images: the "
                                   f"file was truncated while in use; delete it and rerun `dvc repro prepare`")
            done += k

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The images at ``rows``, in that order, read in ascending file order (one read when they are contiguous)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        if not len(rows):
            return out
        if rows[0] >= 0 and rows[-1] < len(self) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            self._pread(out, HEADER_BYTES + int(rows[0]) * self.record)
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"rows outside [0, {len(self)})")
        for k in np.argsort(rows, kind="stable").tolist():
            self._pread(out[k], HEADER_BYTES + int(rows[k]) * self.record)
        return out


def _refuse(path: Path, why: str) -> DatasetError:
    return DatasetError(f"{show_path(path)}: {why}; delete it and rerun `dvc repro prepare` (it is rebuilt from "
                        f"data.root)")


def _read_header(path: Path, spec: Spec) -> tuple[str, str]:
    """Check the header and the size of the file at ``path`` against ``spec``; returns (stamp, sha256)."""
    try:
        fh, size = io.open_regular(path, "a decoded array", None, DatasetError)
        with fh:
            raw = fh.read(HEADER.size)
    except DatasetError as e:  # not a regular file (a FIFO would block the reader)
        raise DatasetError(f"{e}; delete it and rerun `dvc repro prepare` (it is rebuilt from data.root)") from None
    except OSError as e:
        raise _refuse(path, f"cannot read it ({e.strerror or e})") from None
    if len(raw) < HEADER.size:
        raise _refuse(path, f"{size:,} bytes, too short to hold a decoded array's header (a torn or foreign file)")
    magic, version, n, c, h, w, key, stamp, sha = HEADER.unpack(raw)
    if magic != MAGIC:
        raise _refuse(path, "not a kdprune decoded array (its magic bytes differ)")
    if version != VERSION:
        raise _refuse(path, f"format version {version}, this kdprune reads version {VERSION}")
    if not (1 <= n <= MAX_IMAGES and c in (1, 3) and 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise _refuse(path, f"its header declares the shape ({n:,}, {c}, {h}, {w}), outside what prepare writes "
                            f"(at most {MAX_IMAGES:,} images of 1 or 3 channels, sides at most {MAX_SIDE}): the "
                            f"file is damaged or forged")
    if key.hex() != spec.key:
        raise _refuse(path, f"its header is of key {key.hex()[:16]}..., not {spec.key[:16]}... (a renamed file)")
    if (n, c, h, w) != spec.shape:
        raise _refuse(path, f"its header declares the shape {(n, c, h, w)}, prepare recorded {spec.shape}")
    expected = HEADER_BYTES + n * c * h * w
    if size != expected:
        raise _refuse(path, f"{size:,} bytes, its header declares {expected:,} ({n:,} images of {c} x {h} x {w}): a "
                            f"truncated or padded file")
    return stamp.hex(), sha.hex()


def open_array(spec: Spec, directory: Path) -> DecodedArray:
    """The checked array of ``spec`` (``FileNotFoundError`` when there is none)."""
    path = Path(directory) / spec.name
    if not path.exists():
        raise FileNotFoundError(path)
    _, sha = _read_header(path, spec)
    if spec.sha256 is not None and sha != spec.sha256:
        raise _refuse(path, f"its pixels' sha256 {sha[:16]}... is not the {spec.sha256[:16]}... that prepare "
                            f"recorded in dataset.pt (the images under data.root changed since)")
    return DecodedArray(path, spec)


def verify(path: Path, spec: Spec, on_chunk: Callable[[np.ndarray], None] | None = None) -> str:
    """Read the whole payload, check it against the header's sha256 and return it; ``on_chunk`` sees it in
    whole images."""
    _, sha = _read_header(path, spec)
    h = hashlib.sha256()
    arr = DecodedArray(path, spec)
    try:
        per = max(1, READ_CHUNK // arr.record)
        for start in range(0, len(arr), per):
            x = arr.read(np.arange(start, min(len(arr), start + per)))
            h.update(memoryview(x).cast("B"))
            if on_chunk is not None:
                on_chunk(x)
    finally:
        arr.close()
    if h.hexdigest() != sha:
        raise _refuse(path, "its pixels do not match its header's sha256 (modified or damaged after it was written)")
    return sha


def check_space(directory: Path, nbytes: int, root: str) -> None:
    """Refuse, before anything is written, arrays of ``nbytes`` that would leave less than ``KEEP_FREE`` free."""
    probe = Path(directory).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes + KEEP_FREE > free:
        raise DatasetError(f"data.root = {show_path(root)}: its decoded images need {nbytes / 2**30:,.2f} GiB in "
                           f"{show_path(directory)}, which has {free / 2**30:,.2f} GiB free (kdprune leaves "
                           f"{KEEP_FREE >> 30} GiB free); free some space, point ${ENV_DIR} at a larger disk, or "
                           f"lower data.image_size")


@contextlib.contextmanager
def locked(directory: Path, spec: Spec) -> Iterator[None]:
    """An exclusive lock on ``spec``'s array: one process builds it, the others wait and then open it."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(Path(directory) / f"{spec.name}.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def spec_for(split: str, files: FileIndex, preprocessing: dict) -> Spec:
    """The array of ``files`` (one split) decoded as ``preprocessing`` says; its key: see the module docstring."""
    p = preprocessing
    key = digest("kdprune decoded array", VERSION, split, files.root, files.blob, files.offsets, files.sizes,
                 sorted(p.items()))
    return Spec(split, key, (len(files), int(p["channels"]), int(p["image_size"]), int(p["image_size"])), None)


def source_stamp(files: FileIndex) -> str:
    """What may change the pixels without changing the key: the files' mtimes (one ``stat`` each) and PIL's
    version."""
    import PIL  # heavy optional: the decoder whose version the stamp holds (imported where images are read)

    mtimes = np.empty(len(files), dtype=np.int64)
    for i in range(len(files)):
        try:
            mtimes[i] = os.stat(files.path(i)).st_mtime_ns
        except OSError as e:
            raise DatasetError(f"{show_path(files.path(i))}: cannot read the image ({e.strerror or e}); it was "
                               f"listed by `dvc repro prepare`") from None
    return digest(PIL.__version__, mtimes)


def _stamp(path: Path, spec: Spec) -> str | None:
    """The source stamp of the array at ``path``; None when there is none; an invalid one is refused."""
    return _read_header(path, spec)[0] if path.exists() else None


def _decode(files: FileIndex, preprocessing: dict, num_workers: int | None) -> Iterator[np.ndarray]:
    for x in decoded_chunks(batches_for(files, preprocessing), torch.arange(len(files)), num_workers):
        yield x.numpy()


def _seen(chunks: Iterable[np.ndarray], on_chunk: Callable[[np.ndarray], None] | None) -> Iterator[np.ndarray]:
    for x in chunks:
        if on_chunk is not None:
            on_chunk(x)
        yield x


def prepare_arrays(root: str, splits: dict[str, FileIndex], preprocessing: dict, directory: Path,
                   num_workers: int | None, on_chunk: dict[str, Callable[[np.ndarray], None]] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Spec]:
    """prepare's side: each split's array, reused when its file holds the same key and stamp (and its pixels
    match its sha256: read whole), else decoded and written; ``on_chunk[split]`` sees every image once either
    way. The free space is checked for all the arrays to write before any is written."""
    on_chunk = on_chunk or {}
    directory = Path(directory)
    specs = {split: spec_for(split, files, preprocessing) for split, files in splits.items()}
    stamps = {split: source_stamp(files) for split, files in splits.items()}
    stale = [s for s in specs if _stamp(directory / specs[s].name, specs[s]) != stamps[s]]
    check_space(directory, sum(specs[s].nbytes for s in stale), root)
    out = {}
    for split, spec in specs.items():
        path = directory / spec.name
        with locked(directory, spec):
            if _stamp(path, spec) == stamps[split]:
                sha = verify(path, spec, on_chunk.get(split))
                what = "reused"
            else:
                chunks = _seen(_decode(splits[split], preprocessing, num_workers), on_chunk.get(split))
                sha = build(directory, spec, stamps[split], chunks)
                what = "decoded into"
        out[split] = Spec(split, spec.key, spec.shape, sha)
        if log is not None:
            log(f"{split}: {what} {show_path(path)} ({spec.nbytes / 2**20:,.1f} MiB)")
    return out


def open_or_rebuild(spec: Spec, files: FileIndex, preprocessing: dict, directory: Path | None = None,
                    num_workers: int | None = None) -> DecodedArray:
    """The loaders' side: the checked array of ``spec``; a missing one is decoded again from ``files`` (its
    pixels must hash to the sha256 prepare recorded)."""
    directory = default_dir() if directory is None else Path(directory)
    try:
        return open_array(spec, directory)
    except FileNotFoundError:
        pass
    with locked(directory, spec):
        if not (directory / spec.name).exists():  # nobody built it while we waited for the lock
            check_space(directory, spec.nbytes, files.root)
            build(directory, spec, source_stamp(files), _decode(files, preprocessing, num_workers), spec.sha256)
    return open_array(spec, directory)


def build(directory: Path, spec: Spec, stamp: str, chunks: Iterable[np.ndarray],
          expect_sha256: str | None = None) -> str:
    """Write ``chunks`` (uint8 (n, C, H, W), N images in all) as ``spec``'s array and return its sha256; call it
    inside ``locked``. With ``expect_sha256``, pixels that hash otherwise are refused and nothing is kept."""
    path = Path(directory) / spec.name
    n, c, h, w = spec.shape
    sha = hashlib.sha256()
    with io.atomic_path(path, spec.nbytes) as tmp:
        with open(tmp, "r+b") as fh:
            try:
                os.posix_fallocate(fh.fileno(), 0, spec.nbytes)  # a full disk fails here, not midway
            except OSError as e:
                if e.errno in io.DISK_FULL:
                    raise
                # a file system without fallocate: the writes below find out
            fh.write(b"\0" * HEADER_BYTES)
            count = 0
            for x in chunks:
                x = np.ascontiguousarray(x, dtype=np.uint8)
                if x.shape[1:] != (c, h, w) or count + len(x) > n:
                    raise ValueError(f"decoded chunk {x.shape} does not fit {spec.shape} after {count} images")
                b = memoryview(x).cast("B")
                sha.update(b)
                fh.write(b)
                count += len(x)
            if count != n:
                raise ValueError(f"decoded {count} images, expected {n}")
            if expect_sha256 is not None and sha.hexdigest() != expect_sha256:
                raise _refuse(path, f"rebuilt from data.root, its pixels hash to {sha.hexdigest()[:16]}..., not "
                                    f"the {expect_sha256[:16]}... that prepare recorded: the images changed since "
                                    f"prepare; rerun `dvc repro -f prepare`")
            fh.seek(0)
            fh.write(HEADER.pack(MAGIC, VERSION, n, c, h, w, bytes.fromhex(spec.key), bytes.fromhex(stamp),
                                 sha.digest()))
            fh.flush()
    with contextlib.suppress(OSError):  # the rename itself survives a crash once the directory is synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return sha.hexdigest()
