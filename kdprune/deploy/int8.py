"""INT8 models made by onnxruntime's own static quantizer (``onnxruntime.quantization.quantize_static``).

The recipe, the same for every model (teacher and students, ``quantize.method`` ptq and qat):

- ``quant_pre_process`` first (shape inference and graph optimisation: BatchNorm folded into the conv before it);
- QDQ format, weights per output channel, symmetric int8; activations per tensor, uint8, ranges by MinMax
  calibration on the calibration batches (``quantize.calibration_images`` training images, eval transforms);
- every conv, linear (Gemm/MatMul) and the ops between them that onnxruntime quantizes by default; nothing is
  excluded (docs/deployment.md gives the measurement behind that choice).

Symmetric weights map 0 to 0, so a magnitude-pruned model keeps exactly its zeros in the INT8 file (gzip then
turns them into bytes saved). The fp32 file's ``metadata_props`` are copied onto the INT8 file, with
``quantization`` set to what made it.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from kdprune import io
from kdprune.io import ExportError

INT8_SUFFIX = ".int8.onnx"


def int8_path(fp32_path: str | os.PathLike) -> Path:
    """models/export/<name>.onnx -> models/export/<name>.int8.onnx"""
    p = Path(fp32_path)
    return p.with_name(p.name.removesuffix(".onnx") + INT8_SUFFIX)


def gzip_bytes(path: str | os.PathLike) -> int:
    """Bytes of the file gzip-compressed (level 9, no timestamp): the size a download or an app bundle carries."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9, mtime=0))


class _Batches:
    """onnxruntime's CalibrationDataReader over arrays (N, C, H, W) float32 fed to input ``name``."""

    def __init__(self, batches: Iterable[np.ndarray], name: str):
        self._it: Iterator[np.ndarray] = iter(batches)
        self.name = name

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {self.name: np.ascontiguousarray(x, dtype=np.float32)}


def _metadata(path: Path) -> dict[str, str]:
    import onnx  # heavy optional dependency: only where ONNX files are written

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def set_metadata(path: str | os.PathLike, props: dict[str, str]) -> None:
    """Replace the ``metadata_props`` of the ONNX file at ``path`` (rewritten atomically)."""
    import onnx  # heavy optional dependency: only where ONNX files are written

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k in sorted(props):
        model.metadata_props.add(key=str(k), value=str(props[k]))
    with io.atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def quantize(fp32_path: str | os.PathLike, calibration: Iterable[np.ndarray], out_path: str | os.PathLike | None = None,
             label: str = "int8-ptq", input_name: str = "x", exclude: Iterable[str] = ()) -> Path:
    """Write the INT8 model of the fp32 ONNX file ``fp32_path`` (default: :func:`int8_path` of it), calibrated
    on ``calibration`` (float32 batches, already normalised as the model expects). Returns its path.
    ``exclude``: names of nodes (of the pre-processed graph) left in fp32; the pipeline excludes none
    (benchmarks/int8_deploy.py measures what excluding the first conv or the classifier would give)."""
    import onnxruntime.quantization as q  # heavy optional dependency: only when quantizing
    from onnxruntime.quantization.shape_inference import quant_pre_process  # heavy optional: as above

    fp32_path = Path(fp32_path)
    out = Path(out_path) if out_path is not None else int8_path(fp32_path)
    props = _metadata(fp32_path)
    with tempfile.TemporaryDirectory(prefix="kdprune-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # its progress chatter
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
                q.quantize_static(str(pre), str(Path(tmp) / "int8.onnx"), _Batches(calibration, input_name),
                                  quant_format=q.QuantFormat.QDQ, per_channel=True,
                                  activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                                  calibrate_method=q.CalibrationMethod.MinMax, nodes_to_exclude=list(exclude))
        except Exception as e:  # noqa: BLE001 - onnxruntime's quantizer raises many types for graphs it cannot handle
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{fp32_path}: onnxruntime cannot quantize it to INT8: {first[:300]}; "
                              "set quantize.method: none to skip INT8") from None
        with io.atomic_path(out) as dst:
            shutil.copyfile(Path(tmp) / "int8.onnx", dst)  # /tmp may be another filesystem
    set_metadata(out, {**props, "quantization": label})
    return out
