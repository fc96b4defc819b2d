"""Is this Python the project's venv? A check that imports nothing heavy, run before any stage or tool.

DVC runs each stage's bare ``python``: without the venv activated that is the system Python, which
lacks torch and the rest, and the stage would die with an ImportError traceback (after DVC has
already deleted the stage's outputs). ``require()`` turns that into one line saying what to do.
"""
from __future__ import annotations

import importlib.util
import sys

# import names of requirements.txt's packages that the stages and tools import
REQUIRED = ("torch", "torchvision", "numpy", "yaml", "matplotlib", "pandas", "scipy", "tqdm", "mlflow")
EXIT_CODE = 2


def missing(modules=REQUIRED) -> list[str]:
    """The modules of ``modules`` that this interpreter cannot import (found by name; nothing is imported)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require(modules=REQUIRED) -> None:
    """Exit 2 with one line when this interpreter lacks a requirement; otherwise do nothing."""
    lacking = missing(modules)
    if lacking:
        print(f"kdprune: this python ({sys.executable}) lacks {', '.join(lacking)}; "
              "activate the venv: . .venv/bin/activate (or use ./run.sh)", file=sys.stderr)
        sys.exit(EXIT_CODE)
