"""Classify image files with an exported kdprune ONNX model: ``python -m kdprune predict MODEL.onnx IMAGE...``.

The model's ``metadata_props`` (written by kdprune's export; ``kdprune.onnxmeta``) say how its inputs were made:
each image is decoded exactly as training decoded it (``kdprune.imaging``: 8 bits, L or RGB, the shorter side
resized, the centre crop), normalised to ``(pixel / 255 - mean) / std`` (float32, NCHW) and run with
onnxruntime (CPU) in batches; the softmax of the logits gives the probabilities. Needs PIL, numpy and
onnxruntime only: no torch.

Output, one line per image: ``path: class (0.973), class (0.012), ...``, the top K classes, most probable first
(paths and class names shown escaped, so a name holding a newline or a terminal escape cannot forge a line).
``--json``: one JSON document, a list of ``{"image": path, "top": [{"class": name, "index": i, "prob": p}, ...]}``
in the order the images were given.

Every refusal is one line on stderr naming the file or the metadata key, exit status 2, and nothing on stdout:
a model that is missing, not ONNX or without (or with malformed) kdprune metadata, an image that is missing,
not an image, truncated, a decompression bomb or of an aspect ratio over 20:1, more than 10,000 images."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort

from kdprune import imaging
from kdprune.errors import UserError
from kdprune.imaging import show_path
from kdprune.io import read_regular
from kdprune.onnxmeta import MetadataError, ModelMetadata, parse_metadata

EXIT_CODE = 2
DEFAULT_TOP_K = 5
MAX_IMAGES = 10_000  # a call; more: split them over several calls
MAX_BATCH = 64  # images run together
BATCH_BYTES = 256 << 20  # float32 input of one batch, at most (a batch of one image may be larger)
MAX_MODEL_BYTES = (2 << 30) - 1  # protobuf's limit: a single-file ONNX model is under 2 GiB


class PredictError(UserError):
    """A model, an image or an argument predict refuses; the message is one line naming it."""


def load_model(path: str) -> tuple[ort.InferenceSession, ModelMetadata]:
    """onnxruntime's CPU session of the ONNX file ``path`` and its parsed kdprune metadata; the graph's input and
    output checked against the metadata."""
    name = show_path(path)
    data = read_regular(path, "the ONNX model", MAX_MODEL_BYTES, PredictError,
                        missing="no such file (the ONNX model)")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a refusal is our one line, not onnxruntime's log too
    try:
        sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail, InvalidProtobuf, InvalidGraph...
        raise PredictError(f"{name}: not an ONNX model onnxruntime can load ({first_line(e)})") from None
    try:
        meta = parse_metadata(dict(sess.get_modelmeta().custom_metadata_map))
    except MetadataError as e:
        raise PredictError(f"{name}: {e}") from None
    check_graph(sess, meta, name)
    return sess, meta


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def check_graph(sess: ort.InferenceSession, meta: ModelMetadata, name: str) -> None:
    inputs, outputs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
    if len(inputs) != 1 or inputs[0].name != meta.input_name:
        raise PredictError(f"{name}: metadata_props['input_name'] = {meta.input_name!r}, but the graph's inputs are "
                           f"{[i.name for i in inputs]}; predict needs the one image input it names")
    if meta.output_name not in outputs:
        raise PredictError(f"{name}: metadata_props['output_name'] = {meta.output_name!r}, but the graph's outputs "
                           f"are {outputs}")
    shape, want = inputs[0].shape, [None, meta.channels, meta.image_size, meta.image_size]
    fixed = [d if isinstance(d, int) else None for d in shape] if isinstance(shape, list) else None
    if inputs[0].type != "tensor(float)" or fixed is None or len(fixed) != 4 or \
            any(f is not None and w is not None and f != w for f, w in zip(fixed, want)):
        raise PredictError(f"{name}: the graph's input {meta.input_name!r} is {inputs[0].type} of shape {shape}; the "
                           f"metadata (channels {meta.channels}, image_size {meta.image_size}) asks for float of "
                           f"shape [batch, {meta.channels}, {meta.image_size}, {meta.image_size}]")


def batch_size(sess: ort.InferenceSession, meta: ModelMetadata) -> tuple[int, bool]:
    """(images a run, whether the batch axis is fixed: a last batch short of it is padded with zeros)."""
    first = sess.get_inputs()[0].shape[0]
    if isinstance(first, int) and first > 0:
        return first, True
    per_image = 4 * meta.channels * meta.image_size ** 2
    return max(1, min(MAX_BATCH, BATCH_BYTES // per_image)), False


def normalise(images: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """float32 NCHW ``(uint8 / 255 - mean) / std`` of uint8 (N, C, H, W)."""
    mean = np.asarray(meta.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta.std, np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) / np.float32(255) - mean) / std


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def probabilities(sess: ort.InferenceSession, meta: ModelMetadata, model: str,
                  images: Sequence[str]) -> Iterator[np.ndarray]:
    """Batch by batch, in the order given: (images of the batch, classes) float64, the softmax of the logits."""
    n, fixed = batch_size(sess, meta)
    for start in range(0, len(images), n):
        paths = images[start:start + n]
        x = np.stack([imaging.load(p, meta.channels, meta.resize_size, meta.image_size, meta.interpolation)
                      for p in paths])
        if fixed and len(paths) < n:
            x = np.concatenate([x, np.zeros((n - len(paths), *x.shape[1:]), x.dtype)])
        try:
            logits = sess.run([meta.output_name], {meta.input_name: normalise(x, meta)})[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime's own errors
            raise PredictError(f"{show_path(model)}: onnxruntime failed on {show_path(paths[0])} and the rest of its "
                               f"batch ({first_line(e)})") from None
        if logits.ndim != 2 or logits.shape[0] != len(x):
            raise PredictError(f"{show_path(model)}: the output {meta.output_name!r} has shape {list(logits.shape)} for "
                               f"a batch of {len(x)}; predict needs (batch, classes) logits")
        if logits.shape[1] != len(meta.classes):
            raise PredictError(f"{show_path(model)}: metadata_props['classes'] lists {len(meta.classes)} classes, but "
                               f"the model gives {logits.shape[1]} logits per image")
        logits = logits[:len(paths)]
        bad = ~np.isfinite(logits).all(axis=1)
        if bad.any():
            raise PredictError(f"{show_path(model)}: non-finite logits (NaN or inf) for "
                               f"{show_path(paths[int(np.argmax(bad))])}; the model's weights are broken")
        yield softmax(logits)


def top(probs: np.ndarray, classes: Sequence[str], k: int) -> list[list[dict]]:
    """Per image, its ``k`` most probable classes, most probable first (ties: the lower index first)."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[i], "index": int(i), "prob": float(p[i])} for i in row] for p, row in zip(probs, order)]


def render(images: Sequence[str], tops: list[list[dict]], as_json: bool) -> str:
    if as_json:  # ensure_ascii: every control character (and anything not ASCII) escaped
        return json.dumps([{"image": str(p), "top": t} for p, t in zip(images, tops)], indent=1) + "\n"
    return "".join(f"{show_path(p)}: " + ", ".join(f"{show_path(c['class'])} ({c['prob']:.3f})" for c in t) + "\n"
                   for p, t in zip(images, tops))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kdprune predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an ONNX model exported by kdprune (with its preprocessing in metadata_props)")
    ap.add_argument("images", nargs="+", metavar="IMAGE", help=f"image files (at most {MAX_IMAGES:,} a call)")
    ap.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                    help=f"the K most probable classes per image (default {DEFAULT_TOP_K}); at least 1, and a K "
                         f"above the model's number of classes is clipped to it")
    ap.add_argument("--json", action="store_true", help="one JSON document instead of a line per image")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.top_k < 1:
            raise PredictError(f"--top-k {args.top_k}: must be at least 1 (a K above the number of classes is "
                               f"clipped to it)")
        if len(args.images) > MAX_IMAGES:
            raise PredictError(f"{len(args.images):,} images: predict takes at most {MAX_IMAGES:,} a call; split "
                               f"them over several calls")
        sess, meta = load_model(args.model)
        k = min(args.top_k, len(meta.classes))
        tops = [t for probs in probabilities(sess, meta, args.model, args.images) for t in top(probs, meta.classes, k)]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CODE
    sys.stdout.write(render(args.images, tops, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
