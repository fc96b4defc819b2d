"""Where the ``dvc`` executable is: on PATH, else beside the running Python (a venv's bin/ that was not
activated, e.g. ``.venv/bin/python -m kdprune ...``). Every command that starts DVC asks here, so none of
them fails for a venv that was merely not activated, and each passes :func:`dvc_env` to it: DVC's queue starts
its worker as plain ``dvc`` and the stages run plain ``python``, both looked up on PATH."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def find_dvc() -> str | None:
    """The path of ``dvc``, or None when neither PATH nor the running Python's directory has one."""
    return shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))


def dvc_env() -> dict[str, str]:
    """This environment with the found ``dvc``'s directory and the running Python's first on PATH. Without it, a
    venv that was not activated loses every queued experiment: ``dvc queue start`` succeeds, but its daemon
    cannot start the worker (FileNotFoundError: 'dvc'), and the stages' ``python`` would be another one."""
    dirs = [str(Path(sys.executable).parent)]
    found = find_dvc()
    if found:
        dirs.insert(0, str(Path(found).parent))
    path = list(dict.fromkeys(dirs)) + [d for d in os.environ.get("PATH", "").split(os.pathsep)
                                          if d and d not in dirs]
    return {**os.environ, "PATH": os.pathsep.join(path)}
