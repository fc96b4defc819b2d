"""Imported only if kdprune wrongly imports a factory that a model file names: it leaves a marker file."""
import os
from pathlib import Path

marker = os.environ.get("KDPRUNE_HOSTILE_MARKER")
if marker:
    Path(marker).write_text("imported\n")


def make(num_classes: int, **kwargs):  # pragma: no cover - must never run
    raise AssertionError("hostile factory called")
