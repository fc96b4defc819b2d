"""Where the ``dvc`` executable is: on PATH, else beside the running Python (a venv's bin/ that was not
activated, e.g. ``.venv/bin/python -m kdprune ...``). Every command that starts DVC asks here, so none of
them fails for a venv that was merely not activated."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def find_dvc() -> str | None:
    """The path of ``dvc``, or None when neither PATH nor the running Python's directory has one."""
    return shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))
