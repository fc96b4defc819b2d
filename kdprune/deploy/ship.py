"""One model out of the pipeline and into files a runtime reads: fp32 ONNX with its preprocessing and classes
in ``metadata_props``, the INT8 file made from it, and what was measured on both through onnxruntime.

``ship`` is what the evaluate stage does for the teacher and for each student:

1. ``models/export/<name>.onnx``: torch's export, checked against torch on random inputs (logits within
   ``ONNX_TOLERANCE``), then given the metadata (kdprune/onnxmeta.py);
2. its test accuracy through onnxruntime over the whole test split, ``acc_<name>_onnx``, which must match
   torch's ``acc_<name>`` within ``ACC_PARITY`` points, or the stage fails (the file is not the model);
3. unless ``quantize.method: none``, ``models/export/<name>.int8.onnx`` (kdprune/deploy/int8.py) and its
   accuracy ``acc_<name>_int8``;
4. the bytes of each file and of its gzip.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

import kdprune
from kdprune import onnxmeta
from kdprune.deploy import int8, ort
from kdprune.export import export_onnx, onnx_parity
from kdprune.io import ExportError

ONNX_TOLERANCE = 1e-3  # max |onnxruntime - torch| on the logits, fp32 on CPU, per unit of max(1, max |logit|)
ACC_PARITY = 0.1  # points: the ONNX file's test accuracy against torch's
Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def code_commit(root: str | Path = ".") -> str:
    """The last git commit that changed kdprune/ or stages/ (the code that made a file), "+dirty" when either
    has uncommitted changes, "unknown" without git. Not HEAD: a commit of results only leaves it as it is, so
    re-running unchanged code writes byte-identical files."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()

    try:
        commit = git("log", "-1", "--format=%H", "--", "kdprune", "stages")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "kdprune", "stages")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def preprocessing(meta: dict, data: dict) -> dict:
    """The eval preprocessing of the prepared data (image folders: their resize and crop; the built-in datasets:
    stored at their own size), as onnxmeta.metadata_props takes it."""
    pre = data.get("preprocessing") or {}
    shape = meta["input_shape"]
    return {"image_size": int(pre.get("image_size", shape[-1])), "resize_size": int(pre.get("resize_size", shape[-1])),
            "interpolation": pre.get("interpolation", "bilinear"), "channels": int(shape[0]),
            "mean": [float(v) for v in data["mean"]], "std": [float(v) for v in data["std"]],
            "classes": [str(c) for c in data["classes"]], "dataset": str(data["name"])}


def torch_batches(loader) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """A loader's (x, y) batches as contiguous NCHW float32 arrays and int64 labels."""
    for x, y in loader:
        yield np.ascontiguousarray(x.float().cpu().numpy()), y.cpu().numpy()


def export_checked(model: nn.Module, path: Path, shape: tuple, seed: int) -> float:
    """Export ``model`` to ONNX at ``path`` and check the logits against torch; returns the max |difference|."""
    export_onnx(model, path, shape)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(seed))
    diff, scale = onnx_parity(model, path, x)
    # relative to the logits' size once they pass 1 (fp32 rounding scales with them); NaN fails (max keeps 1.0)
    allowed = ONNX_TOLERANCE * max(1.0, scale)
    if not diff <= allowed:  # NaN (a broken export) fails too
        raise ExportError(f"{path}: onnxruntime logits differ from torch by {diff:.3g} > {allowed:.3g} "
                          f"({ONNX_TOLERANCE} x max(1, largest |torch logit| {scale:.3g}))")
    return diff


def check_accuracy(path: Path, acc_onnx: float, acc_torch: float) -> None:
    if not abs(acc_onnx - acc_torch) <= ACC_PARITY:  # NaN fails
        raise ExportError(f"{path}: its test accuracy through onnxruntime is {acc_onnx:.2f} %, torch's is "
                          f"{acc_torch:.2f} %: more than {ACC_PARITY} pt apart, so the file is not the model that "
                          f"was measured; a broken export (report it, or set evaluate.onnx: false)")


def ship(name: str, model: nn.Module, shape: tuple, export_dir: Path, props: dict, acc_torch: float,
         test: Batches, calibration: Batches | None, label: str, seed: int, threads: int | None = None) -> dict:
    """Export, quantize and measure one model (see the module's docstring); returns its metrics:
    ``acc_<name>_onnx``, ``bytes_onnx_<name>``, ``bytes_onnx_gzip_<name>``, ``onnx_max_abs_diff_<name>`` and,
    with ``calibration``, ``acc_<name>_int8``, ``bytes_onnx_int8_<name>``, ``bytes_onnx_int8_gzip_<name>``.
    ``props``: :func:`preprocessing` of the data; ``label``: the INT8 file's ``quantization`` tag."""
    path = export_dir / f"{name}.onnx"
    out: dict = {f"onnx_max_abs_diff_{name}": export_checked(model, path, shape, seed)}
    common = dict(props, variant=name, version=kdprune.__version__, commit=code_commit())
    int8.set_metadata(path, onnxmeta.metadata_props(**common, quantization="none"))
    acc, _ = ort.accuracy(ort.session(path, threads), test())
    check_accuracy(path, acc, acc_torch)
    out[f"acc_{name}_onnx"] = acc
    out[f"bytes_onnx_{name}"] = path.stat().st_size
    out[f"bytes_onnx_gzip_{name}"] = int8.gzip_bytes(path)
    if calibration is not None:
        q = int8.quantize(path, (x for x, _ in calibration()), label=label)
        acc_q, _ = ort.accuracy(ort.session(q, threads), test())
        out[f"acc_{name}_int8"] = acc_q
        out[f"bytes_onnx_int8_{name}"] = q.stat().st_size
        out[f"bytes_onnx_int8_gzip_{name}"] = int8.gzip_bytes(q)
    return out
