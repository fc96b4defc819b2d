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

import collections
import importlib.util
import json
import math
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
from kdprune.io import ExportError
from kdprune.models import build_model, check_spec, is_zoo, spec_of

MAGIC = b"KDPC1\n"
COMPACT_FORMAT = "kdprune-compact-v1"
INT_DTYPES = {"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool}
ENCODINGS = {"int": {"name", "shape", "encoding", "dtype", "data"}, "bitmask": {"name", "shape", "encoding", "nnz"},
             "dense": {"name", "shape", "encoding"}}  # the keys of a header entry, per encoding
# Caps on the header, checked before it is inflated or parsed: a file may not make the loader allocate more
# than this for its header (a zlib "bomb" of a few KB inflates to gigabytes). The header has one entry per
# state_dict tensor: about 90 KB of JSON for the ResNet-152 layout, 670 KB for a ResNet-1202 (measured);
# 16 MiB leaves room for 20x deeper nets.
MAX_HEADER_BYTES = 16 << 20  # compressed, as stored
MAX_HEADER_JSON_BYTES = 16 << 20  # inflated


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
    header = zlib.compress(json.dumps({"format": COMPACT_FORMAT, "spec": spec_of(model), "meta": meta or {},
                                       "tensors": entries}, sort_keys=True).encode(), 9)
    blob = MAGIC + struct.pack("<I", len(header)) + header + b"".join(bits) + b"".join(values)
    if len(header) > MAX_HEADER_BYTES:
        raise ExportError(f"{path}: the header is {len(header):,} bytes compressed, more than the "
                          f"{MAX_HEADER_BYTES:,} that load_compact accepts")
    with io.atomic_path(path, size=len(blob)) as tmp:
        tmp.write_bytes(blob)
    return len(blob)


def _inflate(path: Path, raw: bytes) -> dict:
    """The header's JSON object; inflates at most MAX_HEADER_JSON_BYTES (+1, to see that there is more)."""
    d = zlib.decompressobj()
    try:
        text = d.decompress(raw, MAX_HEADER_JSON_BYTES + 1)
    except zlib.error as e:
        raise ExportError(f"{path}: corrupted header ({e})") from None
    if len(text) > MAX_HEADER_JSON_BYTES or d.unconsumed_tail:
        raise ExportError(f"{path}: the header inflates to more than {MAX_HEADER_JSON_BYTES:,} bytes "
                          "(kdprune.export.MAX_HEADER_JSON_BYTES); refused")
    if not d.eof or d.unused_data:
        raise ExportError(f"{path}: corrupted header (the zlib stream is truncated or followed by other bytes)")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{path}: corrupted header (not JSON: {str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise ExportError(f"{path}: the header is a JSON {type(header).__name__}, expected an object")
    return header


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, not float


def _check_header(path: Path, header: dict, allowed_factory: str | None = None
                  ) -> tuple[list[dict], list[int], nn.Module | None]:
    """Check every field of the header before any of it is used; returns its tensor entries and their numels.

    The spec must be one ``kdprune.models.check_spec`` accepts (which bounds its parameter count), and the
    entries must be exactly the model's state_dict, name for name and shape for shape, so no entry can
    make the loader allocate more than the model it describes."""
    if header.get("format") != COMPACT_FORMAT:
        raise ExportError(f"{path}: unknown format {header.get('format')!r}, expected {COMPACT_FORMAT!r}")
    if set(header) != {"format", "spec", "meta", "tensors"}:
        raise ExportError(f"{path}: the header has keys {sorted(map(str, header))}, expected "
                          "['format', 'meta', 'spec', 'tensors']")
    if not isinstance(header["meta"], dict):
        raise ExportError(f"{path}: the header's meta is a {type(header['meta']).__name__}, expected an object")
    try:
        check_spec(header["spec"])
    except ValueError as e:
        raise ExportError(f"{path}: the header's spec is not one kdprune can build: {e}") from None
    model = None
    if is_zoo(header["spec"]):
        with torch.device("meta"):  # shapes and dtypes only, nothing allocated
            want = build_model(header["spec"]).state_dict()
    else:  # a torchvision builder (allow-listed) or the params' own custom factory: bounded by what it builds
        try:
            model = build_model(header["spec"], allowed_factory=allowed_factory)
        except io.CheckpointError as e:
            raise ExportError(f"{path}: {e}") from None
        want = model.state_dict()
    tensors = header["tensors"]
    if not isinstance(tensors, list) or not all(isinstance(e, dict) for e in tensors):
        raise ExportError(f"{path}: the header's tensors must be a list of objects")
    names = [e.get("name") for e in tensors]
    if not all(isinstance(n, str) for n in names):
        raise ExportError(f"{path}: every tensor of the header needs a string name; got {names[:5]}")
    repeated = sorted(n for n, k in collections.Counter(names).items() if k > 1)
    if repeated:
        raise ExportError(f"{path}: the header names a tensor more than once: {repeated[:3]}")
    if set(names) != set(want):
        raise ExportError(f"{path}: the header's tensors are not the state_dict of its spec's model (missing: "
                          f"{sorted(set(want) - set(names))[:3]}, unexpected: {sorted(set(names) - set(want))[:3]})")
    numels = []
    for e in tensors:
        name, enc = e["name"], e.get("encoding")
        where = f"{path}: tensor {name!r}"
        if enc not in ENCODINGS or set(e) != ENCODINGS[enc]:
            raise ExportError(f"{where}: encoding {enc!r} with keys {sorted(map(str, e))}; expected one of "
                              + ", ".join(f"{k} {sorted(v)}" for k, v in ENCODINGS.items()))
        shape = e["shape"]
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise ExportError(f"{where}: shape {shape!r} must be a list of non-negative integers")
        if shape != list(want[name].shape):
            raise ExportError(f"{where}: shape {shape} but the spec's model has {list(want[name].shape)}")
        n = math.prod(shape)  # Python ints: no overflow
        numels.append(n)
        if want[name].is_floating_point() != (enc != "int"):
            raise ExportError(f"{where}: encoding {enc!r} does not fit its dtype {want[name].dtype}")
        if enc == "int":
            if e["dtype"] not in INT_DTYPES or INT_DTYPES[e["dtype"]] != want[name].dtype:
                raise ExportError(f"{where}: dtype {e['dtype']!r}; the spec's model has "
                                  f"{str(want[name].dtype).removeprefix('torch.')}")
            data, dtype = e["data"], INT_DTYPES[e["dtype"]]
            lo, hi = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
            if not (isinstance(data, list) and len(data) == n and all(isinstance(v, int) for v in data)):
                raise ExportError(f"{where}: data must be a list of {n} integers")
            if not all(lo <= v <= hi for v in data):
                raise ExportError(f"{where}: data do not fit {e['dtype']} (values in [{lo}, {hi}])")
        elif enc == "bitmask" and not (_is_int(e["nnz"]) and 0 <= e["nnz"] <= n):
            raise ExportError(f"{where}: nnz = {e['nnz']!r}, must be an integer in [0, {n}]")
    return tensors, numels, model


def load_compact(path: str | os.PathLike, allowed_factory: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model from a compact file. Returns ``(model, meta)``; floats come back as fp32.
    ``allowed_factory``: as for ``checkpoint.load_checkpoint``, the only custom factory that may be imported.

    Every malformed file raises :class:`ExportError` naming the file and what is wrong: the header is
    capped (MAX_HEADER_BYTES, MAX_HEADER_JSON_BYTES) and checked field by field (:func:`_check_header`)
    and the payload's size against it before anything else is read or allocated."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise ExportError(f"{path}: file not found") from None
    except OSError as e:
        raise ExportError(f"{path}: cannot read it ({e.strerror})") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(len(MAGIC) + 4)
        if len(prefix) < len(MAGIC) + 4 or not prefix.startswith(MAGIC):
            raise ExportError(f"{path}: not a kdprune compact file (bad magic)")
        (hlen,) = struct.unpack("<I", prefix[len(MAGIC):])
        if hlen > MAX_HEADER_BYTES:
            raise ExportError(f"{path}: header length {hlen:,} bytes, more than the {MAX_HEADER_BYTES:,} allowed "
                              "(kdprune.export.MAX_HEADER_BYTES)")
        if hlen > size - len(prefix):
            raise ExportError(f"{path}: header length {hlen:,} bytes but the file has {size - len(prefix):,} "
                              "after the prefix; the file is truncated or corrupted")
        header = _inflate(path, fh.read(hlen))
        tensors, numels, model = _check_header(path, header, allowed_factory)
        pos = len(prefix) + hlen
        bit_bytes = sum((n + 7) // 8 for e, n in zip(tensors, numels) if e["encoding"] == "bitmask")
        value_bytes = sum(2 * (e["nnz"] if e["encoding"] == "bitmask" else n)
                          for e, n in zip(tensors, numels) if e["encoding"] != "int")
        if pos + bit_bytes + value_bytes != size:
            raise ExportError(f"{path}: {size - pos} payload bytes but the header describes {bit_bytes + value_bytes}; "
                              "the file is truncated or corrupted")
        blob = fh.read()
    if len(blob) != bit_bytes + value_bytes:  # the file changed while it was read
        raise ExportError(f"{path}: the file changed while it was read")
    bit_pos, val_pos = 0, bit_bytes
    state = {}
    for e, n in zip(tensors, numels):
        name, shape = e["name"], e["shape"]
        if e["encoding"] == "int":
            state[name] = torch.tensor(e["data"], dtype=INT_DTYPES[e["dtype"]]).reshape(shape)
            continue
        if e["encoding"] == "bitmask":
            nb = (n + 7) // 8
            mask = np.unpackbits(np.frombuffer(blob, np.uint8, nb, bit_pos), count=n).astype(bool)
            bit_pos += nb
            ones = int(np.count_nonzero(mask))
            if ones != e["nnz"]:
                raise ExportError(f"{path}: tensor {name!r}: its bitmask has {ones} set bits but nnz = {e['nnz']}; "
                                  "the file is corrupted")
            dense = np.zeros(n, np.float16)
            dense[mask] = np.frombuffer(blob, np.float16, ones, val_pos)
            val_pos += 2 * ones
        else:
            dense = np.frombuffer(blob, np.float16, n, val_pos).copy()
            val_pos += 2 * n
        state[name] = torch.from_numpy(dense.astype(np.float32)).reshape(shape)
    if model is None:  # a zoo model: check_spec bounded its size; the state matches it name for name
        model = build_model(header["spec"])
    model.load_state_dict(state, strict=True)
    return model, header["meta"]


def compact_bound_bytes(model: nn.Module) -> int:
    """``2 bytes * non-zero floats + 1 bit per float element``: what a bitmask + fp16 format must approach."""
    state = [t for t in _state(model).values() if t.is_floating_point()]
    return 2 * sum(int(torch.count_nonzero(t)) for t in state) + (sum(t.numel() for t in state) + 7) // 8


def onnx_available() -> bool:
    """Both ``onnx`` (the exporter needs it) and ``onnxruntime`` (the parity check) are installed."""
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
    return onnx_parity(model, path, x)[0]


def onnx_parity(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> tuple[float, float]:
    """Run the ONNX file with onnxruntime (CPU): (max |onnx - torch|, max |torch|) over the logits of ``x``.

    The second number scales a tolerance: fp32 rounding differs between the two runtimes by a few ulps of the
    logits, so a student whose logits reach 1e6 (seen at 54x with ``prune.min_layer_density``, on the random
    inputs of the check) differs by 1.0 at a relative error of 3e-7. Non-finite logits from either give NaN
    for both: a broken export, never a pass."""
    import onnxruntime as ort  # heavy optional dependency: only for the parity check

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"x": x.contiguous().numpy()})[0]
    model = model.eval()
    with torch.inference_mode():
        want = model(x).float().numpy()
    if got.shape != want.shape:
        raise ExportError(f"{path}: onnxruntime gave logits of shape {got.shape}, torch {want.shape}")
    if not (np.isfinite(got).all() and np.isfinite(want).all()):
        return float("nan"), float("nan")
    return float(np.abs(got - want).max()), float(np.abs(want).max())
