"""Atomic file writes, safe loading of JSON and torch files, and paths that stay inside the repository.

Every file a stage produces goes through these helpers: the content is written to a temp file
in the destination directory and then moved into place with ``os.replace``, so a killed process
leaves either the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

if TYPE_CHECKING:  # torch is imported where it is used: stages/validate.py imports this module without it
    import torch  # heavy: imported only here, so stages/validate.py can use this module without torch


from kdprune.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unsafe, corrupted or does not fit the expected model."""


class ExportError(UserError, RuntimeError):
    """A deployable export (kdprune.export: compact ``.kdc``, ONNX) could not be written, read back, or does
    not match the model. Defined here, beside the other file errors, so that kdprune.stage can list it
    without importing the exporters."""


class OutputError(OSError):
    """An output could not be written because the disk (or the quota) is full; the message names the file."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] " prefix
        return self.strerror or super().__str__()


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind ``exc``, if any: torch's zip writer turns it into a RuntimeError
    ("unexpected pos"), but keeps the OSError of the failed ``write`` as the exception's context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _output_error(path: Path, err: OSError, size: int | None) -> OutputError:
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"needs {size:,} bytes, " if size is not None else ""
    return OutputError(err.errno, f"{path}: cannot write it: {os.strerror(err.errno)} ({need}{free} on its "
                                  "file system); free some space and rerun. The previous file, if any, is unchanged")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success move it over ``path`` atomically.

    Temp files of an earlier write of the same path that was killed (SIGKILL leaves them behind) are
    removed first, so repeated kills do not fill the disk. One writer per output path is assumed,
    which DVC guarantees (one stage owns each output).

    The file gets the mode a plain ``open(path, "w")`` would give (0666 minus the umask), not mkstemp's
    0600. A full disk (ENOSPC, EDQUOT) raises :class:`OutputError`, one line naming ``path`` and, when
    the caller passes it, the ``size`` in bytes it needed; the temp file is removed and the old ``path``
    is left as it was.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed earlier write
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as e:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        full = _disk_full(e)
        if full is not None:
            raise _output_error(path, full, size) from None
        raise


def _one_line(path: str | os.PathLike) -> str:
    """A path on one line, as it was given (a file name may hold a newline: then escaped)."""
    return str(path) if str(path).isprintable() else repr(str(path))[1:-1]


def open_regular(path: str | os.PathLike, what: str, max_bytes: int | None, error: type[Exception] = UserError,
                 missing: str = "file not found") -> tuple[BinaryIO, int]:
    """``(binary file, its size)`` of ``path``, a regular file (symbolic links followed) of at most ``max_bytes``
    (None: no bound here; the caller bounds what it reads). Anything else is ``error``, one line naming ``path``
    and ``what`` it should be: a FIFO (reading would wait forever for a writer), a device such as /dev/zero
    (endless), a directory, a socket, or a file too large.

    Opened with O_NONBLOCK and checked with ``fstat`` on the open descriptor, so a FIFO never blocks the open and a
    file swapped for one between a check and the open is still caught; O_NONBLOCK means nothing for a regular
    file. ``missing``: the message for a path that does not exist."""
    name = _one_line(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{name}: {missing}") from None
    except OSError as e:
        raise error(f"{name}: cannot read {what} ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "a special file")
            raise error(f"{name}: {kind}, not a regular file; {what} must be a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(f"{name}: {st.st_size:,} bytes; {what} is at most {max_bytes:,} bytes")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, what: str, max_bytes: int, error: type[Exception] = UserError,
                 missing: str = "file not found") -> bytes:
    """The bytes of ``path`` (:func:`open_regular`: a regular file of at most ``max_bytes``), read with that bound
    even if the file grows meanwhile."""
    fh, _ = open_regular(path, what, max_bytes, error, missing)
    with fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{_one_line(path)}: grew past {max_bytes:,} bytes while it was read; {what} is at most "
                    f"{max_bytes:,} bytes")
    return data


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path, size=len(text.encode())) as tmp:
        tmp.write_text(text)


# CSV formula injection (OWASP): a spreadsheet runs a cell that begins with one of these as a formula
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CSV_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_CSV_ESCAPED = re.compile("'+[" + re.escape("".join(CSV_FORMULA_START)) + "]")


def csv_safe(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula: a string that begins (after any quotes) with ``=``, ``+``,
    ``-``, ``@``, a tab or a carriage return gets a leading ``'``, unless it is a plain finite number (``-0.61``).
    Anything but a string is returned as it is. :func:`csv_unescape` undoes it exactly."""
    if not isinstance(value, str) or _CSV_NUMBER.fullmatch(value):
        return value
    if value.lstrip("'").startswith(CSV_FORMULA_START):
        return "'" + value
    return value


def csv_unescape(value: Any) -> Any:
    """The cell :func:`csv_safe` was given (a file written before the escaping reads the same, but for a cell
    that began with quotes and then a formula character)."""
    if isinstance(value, str) and _CSV_ESCAPED.match(value):
        return value[1:]
    return value


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    # Save through a file object: given a path, torch.save names the zip archive's records after the
    # file, and the random temp name would make every save differ (non-deterministic DVC hashes).
    import torch  # heavy: imported only here, so stages/validate.py can use this module without torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", max_bytes: int | None = None) -> Any:
    """Load a torch file with ``weights_only=True``: tensors and plain containers only, never code. The path must
    be a regular file (:func:`open_regular`: a FIFO would hang, a device never ends) of at most ``max_bytes``."""
    import torch  # heavy: imported only here, so stages/validate.py can use this module without torch

    path = Path(path)
    fh, _ = open_regular(path, "a torch file", max_bytes, CheckpointError)
    try:
        with fh:
            return torch.load(fh, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for unsafe or broken files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: {msg}. kdprune only loads tensors and plain containers "
            "(torch.load(weights_only=True)); the file is corrupted, truncated, or holds "
            "pickled objects that could run code."
        ) from None


def resolves_inside(path: str | Path, base: str | Path | None = None) -> bool:
    """Does ``path`` (relative to ``base``, default the working directory: the repository root, where
    stages run) lead into ``base`` once symlinks are resolved? A link inside the repository to a
    directory outside it does not count as inside."""
    root = Path.cwd() if base is None else Path(base)
    try:
        root = root.resolve()
        return (root / path).resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        return False


def path_stays_inside(path: str, base: str | Path | None = None) -> bool:
    """Paths from params: absolute ones are explicit and allowed; relative ones may not climb out of the
    repository (``base``, default the working directory): neither lexically (no '..' out of it) nor
    through a symlink (``resolves_inside``)."""
    p = Path(path)
    if p.is_absolute():
        return True
    depth = 0
    for part in p.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return False
    return resolves_inside(p, base)
