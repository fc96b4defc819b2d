"""The pipeline's metrics files, each metric in exactly one of them, and their merged view.

Each stage writes what it measured, once:

  ============================  ==================================================================
  file                          holds
  ============================  ==================================================================
  metrics/teacher.json          acc_teacher, params_teacher, macs_teacher
  metrics/prune.json            acc_pruned, both compression ratios, sparsities, MAC reduction and
                                the pruned model's counts (``*_pruned``)
  metrics/distill/<v>.json      acc_<v>, train_acc_<v> (quantize.method qat: acc_<v>_fakequant), one file
                                per recovery variant
  metrics/evaluate.json         each student's counts and MACs, its export sizes and ONNX parity; for the
                                teacher and each student the accuracy of its fp32 and INT8 ONNX files
                                through onnxruntime (acc_<m>_onnx, acc_<m>_int8) and their bytes
                                (bytes_onnx[_int8][_gzip]_<m>)
  ============================  ==================================================================

No file repeats another's metric, holds params (they are in params.yaml) or prose. Timings, which
vary from run to run, are not metrics: they are in logs/ (not DVC outputs, not committed).
``collect`` merges the files into one flat dict for MLflow, reports and tests, and refuses a metric
that appears twice or is not a finite number.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS = Path("metrics")
STAGE_FILES = ("teacher.json", "prune.json")  # then distill/*.json, then evaluate.json


class MetricsError(RuntimeError):
    """A metrics file is missing, unreadable, repeats a metric, or holds a non-finite value."""


def files(root: str | Path = ".") -> list[Path]:
    """The metrics files of a finished pipeline under ``root``, in stage order."""
    base = Path(root) / METRICS
    return ([base / f for f in STAGE_FILES] + sorted((base / "distill").glob("*.json"))
            + [base / "evaluate.json"])


def read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MetricsError(f"{path}: not found; run `dvc repro` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetricsError(f"{path}: unreadable ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise MetricsError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


def collect(root: str | Path = ".", require_finite: bool = True) -> dict[str, float]:
    """Every metric of the pipeline under ``root``, flat: ``{"acc_teacher": 92.2, "acc_kd": ..., ...}``.

    ``require_finite``: a NaN or infinite value (a diverged run) raises :class:`MetricsError` naming the
    file and key: such a result must never be logged or reported as one."""
    out: dict[str, float] = {}
    where: dict[str, Path] = {}
    for path in files(root):
        for key, value in read(path).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MetricsError(f"{path}: {key} = {str(value)[:80]!r} is not a number (metrics files hold "
                                   "numbers only)")
            if key in out:
                raise MetricsError(f"{path}: {key} is also in {where[key]}; each metric belongs in one file")
            if require_finite and not math.isfinite(value):
                raise MetricsError(f"{path}: {key} = {value}: not a finite number (did training diverge?)")
            out[key] = value
            where[key] = path
    return out
