"""Fault injection: ``python -m tests.killhook SUBSTR N MODULE [ARGS...]`` runs ``MODULE`` as ``__main__``
and SIGKILLs the process halfway through the N-th file write whose path contains SUBSTR.

Writes are intercepted at the lowest level kdprune uses (``torch.save`` and ``Path.write_text``):
half of the bytes reach the disk, then the process dies without any cleanup, as under the OOM
killer or a scheduler's ``kill -9``. With atomic writes the half-written bytes are in a temp file;
without them they would be in the output itself.
"""
import io
import os
import pathlib
import runpy
import signal
import sys

import torch

substr, nth, module, *args = sys.argv[1:]
nth = int(nth)
seen = 0


def hit(path) -> bool:
    global seen
    if substr in str(path):
        seen += 1
        return seen == nth
    return False


def die_halfway(f, data: bytes) -> None:
    fh = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
    fh.write(data[: len(data) // 2])
    fh.flush()
    os.fsync(fh.fileno())
    print(f"killhook: SIGKILL halfway through writing {getattr(f, 'name', f)}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


_save = torch.save


def save(obj, f, *a, **k):
    if hit(f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "")):
        buf = io.BytesIO()
        _save(obj, buf, *a, **k)
        die_halfway(f, buf.getvalue())
    return _save(obj, f, *a, **k)


_write_text = pathlib.Path.write_text


def write_text(self, data, *a, **k):
    if hit(self):
        die_halfway(self, data.encode())
    return _write_text(self, data, *a, **k)


torch.save = save
pathlib.Path.write_text = write_text
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
