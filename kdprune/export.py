"""Deployable exports of a (pruned) model: a compact sparse checkpoint and ONNX.

Compact format (``.kdc``), written and read here without pickle::

    b"KDPC1\\n" | u32 little-endian header length | zlib(JSON header) | bitmask bytes | fp16 values

The header holds the architecture spec and, per state_dict entry, its name, shape and encoding:

- ``bitmask``: a float tensor stored as 1 bit per element (``numpy.packbits``, non-zero = 1) plus its
  non-zero values as fp16, chosen when that is smaller than dense fp16 (sparsity > 1/16);
- ``dense``: every element as fp16;
- ``int``: integer buffers (BatchNorm's ``num_batches_tracked``) as JSON numbers in the header.

Floats are rounded to fp16 on export, so ``load_compact(export_compact(m))`` gives ``m``'s weights
rounded to fp16 (bit-identical when they already are fp16 values). The bytes on disk are close to the
bound ``2 * non-zeros + 1 bit per element`` (see ``compact_bound_bytes``): the header is small and
compressed.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kdprune import io
from kdprune.errors import UserError

MAGIC = b"KDPC1\n"
COMPACT_FORMAT = "kdprune-compact-v1"
INT_DTYPES = {"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}


class ExportError(UserError, RuntimeError):
    """An export could not be written, read back, or does not match the model."""


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def export_compact(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> int:
    """Write ``model`` in the compact format; return the bytes on disk."""
    entries, bits, values = [], [], []
    for name, t in _state(model).items():
        entry: dict[str, Any] = {"name": name, "shape": list(t.shape)}
        if not t.is_floating_point():
            entry.update(encoding="int", dtype=str(t.dtype).removeprefix("torch."), data=t.reshape(-1).tolist())
        else:
            flat = t.reshape(-1).to(torch.float16)
            nz = flat != 0
            nnz = int(nz.sum())
            if (t.numel() + 7) // 8 + 2 * nnz < 2 * t.numel():
                entry.update(encoding="bitmask", nnz=nnz)
                bits.append(np.packbits(nz.numpy()).tobytes())
                values.append(flat[nz].numpy().tobytes())
            else:
                entry.update(encoding="dense")
                values.append(flat.numpy().tobytes())
        entries.append(entry)
    from kdprune.models import spec_of

    header = zlib.compress(json.dumps({"format": COMPACT_FORMAT, "spec": spec_of(model), "meta": meta or {},
                                       "tensors": entries}, sort_keys=True).encode(), 9)
    blob = MAGIC + struct.pack("<I", len(header)) + header + b"".join(bits) + b"".join(values)
    with io.atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return len(blob)


def load_compact(path: str | os.PathLike, allowed_factory: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model from a compact file. Returns ``(model, meta)``; floats come back as fp32.
    ``allowed_factory``: as for ``io.load_checkpoint``, the only custom factory that may be imported."""
    from kdprune.models import build_model

    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path}: file not found") from None
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise ExportError(f"{path}: not a kdprune compact file (bad magic)")
    (hlen,) = struct.unpack("<I", blob[len(MAGIC):len(MAGIC) + 4])
    pos = len(MAGIC) + 4
    try:
        header = json.loads(zlib.decompress(blob[pos:pos + hlen]))
    except (zlib.error, ValueError) as e:
        raise ExportError(f"{path}: corrupted header ({e})") from None
    if header.get("format") != COMPACT_FORMAT:
        raise ExportError(f"{path}: unknown format {header.get('format')!r}, expected {COMPACT_FORMAT!r}")
    pos += hlen
    tensors = header["tensors"]
    numel = [int(np.prod(e["shape"], dtype=np.int64)) for e in tensors]
    bit_bytes = sum((n + 7) // 8 for e, n in zip(tensors, numel) if e["encoding"] == "bitmask")
    value_bytes = sum(2 * (e["nnz"] if e["encoding"] == "bitmask" else n)
                      for e, n in zip(tensors, numel) if e["encoding"] != "int")
    if pos + bit_bytes + value_bytes != len(blob):
        raise ExportError(f"{path}: {len(blob) - pos} payload bytes but the header describes {bit_bytes + value_bytes}; "
                          "the file is truncated or corrupted")
    bit_pos, val_pos = pos, pos + bit_bytes
    state = {}
    for e in tensors:
        shape, n = e["shape"], int(np.prod(e["shape"], dtype=np.int64))
        if e["encoding"] == "int":
            if e["dtype"] not in INT_DTYPES:
                raise ExportError(f"{path}: {e['name']} has unsupported dtype {e['dtype']!r}")
            state[e["name"]] = torch.tensor(e["data"], dtype=INT_DTYPES[e["dtype"]]).reshape(shape)
            continue
        if e["encoding"] == "bitmask":
            nb = (n + 7) // 8
            mask = np.unpackbits(np.frombuffer(blob, np.uint8, nb, bit_pos), count=n).astype(bool)
            bit_pos += nb
            dense = np.zeros(n, np.float16)
            dense[mask] = np.frombuffer(blob, np.float16, e["nnz"], val_pos)
            val_pos += 2 * e["nnz"]
        else:
            dense = np.frombuffer(blob, np.float16, n, val_pos).copy()
            val_pos += 2 * n
        state[e["name"]] = torch.from_numpy(dense.astype(np.float32)).reshape(shape)
    try:
        model = build_model(header["spec"], allowed_factory=allowed_factory)
    except io.CheckpointError as e:
        raise ExportError(f"{path}: {e}") from None
    model.load_state_dict(state, strict=True)
    return model, header.get("meta", {})


def compact_bound_bytes(model: nn.Module) -> int:
    """``2 bytes * non-zero floats + 1 bit per float element``: what a bitmask + fp16 format must approach."""
    state = [t for t in _state(model).values() if t.is_floating_point()]
    return 2 * sum(int(torch.count_nonzero(t)) for t in state) + (sum(t.numel() for t in state) + 7) // 8


def onnx_available() -> bool:
    """Both ``onnx`` (the exporter needs it) and ``onnxruntime`` (the parity check) are installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...]) -> None:
    """ONNX with a dynamic batch axis (input ``x``, output ``logits``), via torch's TorchScript-based
    exporter: the dynamo exporter needs ``onnxscript``, and this one gives byte-identical files."""
    model = model.eval()
    x = torch.zeros(1, *input_shape)
    with io.atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation + tracer notices about the (constant) return_features flag
        try:
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types for operators it cannot express
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{path}: torch cannot export this model to ONNX at input shape {tuple(input_shape)}: "
                              f"{first[:300]}; set evaluate.onnx: false to skip ONNX") from None


def onnx_max_abs_diff(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Run the ONNX file with onnxruntime (CPU) and return max |onnx - torch| over the logits of ``x``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"x": x.contiguous().numpy()})[0]
    model = model.eval()
    with torch.inference_mode():
        want = model(x).float().numpy()
    if got.shape != want.shape:
        raise ExportError(f"{path}: onnxruntime gave logits of shape {got.shape}, torch {want.shape}")
    return float(np.abs(got - want).max())
