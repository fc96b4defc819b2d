"""The preprocessing an exported ONNX classifier carries in its ``metadata_props`` (string key -> string value):
what ``kdprune.export`` writes (``metadata_props``) and ``python -m kdprune predict`` reads (``parse_metadata``).
Standard library only (no torch, no onnx), so both sides can import it.

=================  ===========================================================================================
key                value
=================  ===========================================================================================
image_size         decimal int in [1, 4096]: the side of the square input
resize_size        decimal int in [image_size, 4096]: the shorter side is resized to this, then centre-cropped
interpolation      ``bilinear`` or ``bicubic`` (PIL's, antialiased)
channels           ``1`` (the image converted to ``L``) or ``3`` (``RGB``)
mean, std          JSON lists of ``channels`` finite floats in [0, 1] pixel units (std above 0):
                   input = (uint8 / 255 - mean) / std, float32, NCHW
classes            JSON list of the class names (strings, 1..256 characters, distinct), in index order
dataset            the dataset's name
input_name         the graph's input (``x``)
output_name        the graph's output (``logits``: no softmax in the graph)
kdprune_version    informational: the kdprune that exported it
kdprune_commit     informational: its git commit (or ``unknown``)
variant            informational: teacher, pruned, kd, finetune, ...
quantization       ``none``, ``int8-ptq`` or ``int8-qat`` (informational)
preprocessing      informational: the steps above as a sentence
=================  ===========================================================================================

JSON values are written with ``sort_keys=True, separators=(",", ":")`` (no spaces), so the same arguments give
the same bytes."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from kdprune.errors import UserError

METADATA_KEYS = ("image_size", "resize_size", "interpolation", "channels", "mean", "std", "classes", "dataset",
                 "input_name", "output_name", "kdprune_version", "kdprune_commit", "variant", "quantization",
                 "preprocessing")
INTERPOLATIONS = ("bilinear", "bicubic")  # = kdprune.imaging.INTERPOLATIONS
QUANTIZATIONS = ("none", "int8-ptq", "int8-qat")
INPUT_NAME, OUTPUT_NAME = "x", "logits"
MAX_SIDE = 4096  # image_size and resize_size
MAX_CLASSES = 100_000
MAX_CLASS_NAME = 256  # characters
MAX_TEXT = 1000  # characters of a string value other than classes (dataset, variant, preprocessing, ...)
MAX_VALUE = MAX_CLASSES * (MAX_CLASS_NAME + 4) + 2  # characters of any value: the longest classes list


class MetadataError(UserError):
    """A model's metadata_props that are missing or malformed; the message names the key."""


@dataclass(frozen=True)
class ModelMetadata:
    image_size: int
    resize_size: int
    interpolation: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    dataset: str
    input_name: str
    output_name: str
    kdprune_version: str
    kdprune_commit: str
    variant: str
    quantization: str
    preprocessing: str


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def describe(image_size: int, resize_size: int, interpolation: str, channels: int, mean: Sequence[float],
             std: Sequence[float]) -> str:
    """The ``preprocessing`` sentence."""
    return (f"16-bit grayscale to 8 bits by its high byte; convert to {'L' if channels == 1 else 'RGB'}; resize "
            f"the shorter side to {resize_size} ({interpolation}, antialiased, PIL); centre-crop {image_size} x "
            f"{image_size}; x = (pixel / 255 - mean) / std with mean {_dumps(list(mean))}, std {_dumps(list(std))}; "
            f"float32 NCHW, input {INPUT_NAME!r}; output {OUTPUT_NAME!r}: logits (apply softmax)")


def metadata_props(image_size: int, resize_size: int, interpolation: str, channels: int, mean: Sequence[float],
                   std: Sequence[float], classes: Sequence[str], dataset: str, variant: str, quantization: str,
                   version: str, commit: str) -> dict[str, str]:
    """The ``metadata_props`` of an exported model, every key of ``METADATA_KEYS``: pure and deterministic. Raises
    ``MetadataError`` (naming the key) for a value ``parse_metadata`` would refuse, so no exporter writes one."""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    for key, values in (("mean", mean), ("std", std)):
        if not all(math.isfinite(v) for v in values):
            raise MetadataError(f"metadata_props[{key!r}]: {values} holds a value that is not finite")
    props = {
        "image_size": str(int(image_size)), "resize_size": str(int(resize_size)), "interpolation": str(interpolation),
        "channels": str(int(channels)), "mean": _dumps(mean), "std": _dumps(std), "classes": _dumps(list(classes)),
        "dataset": str(dataset), "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
        "kdprune_version": str(version), "kdprune_commit": str(commit), "variant": str(variant),
        "quantization": str(quantization),
        "preprocessing": describe(int(image_size), int(resize_size), interpolation, int(channels), mean, std),
    }
    parse_metadata(props)
    return props


def _bad(key: str, raw: str, why: str) -> MetadataError:
    shown = raw if len(raw) <= 80 else raw[:77] + "..."
    return MetadataError(f"metadata_props[{key!r}] = {shown!r}: {why}")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _json(key: str, raw: str) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise _bad(key, raw, f"not valid JSON ({str(e).splitlines()[0][:100]})") from None


def _int(props: Mapping[str, str], key: str, lo: int, hi: int, what: str) -> int:
    raw = props[key]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 5):
        raise _bad(key, raw, f"must be a decimal integer in [{lo}, {hi}] ({what})")
    value = int(raw)
    if not lo <= value <= hi:
        raise _bad(key, raw, f"must be in [{lo}, {hi}] ({what})")
    return value


def _floats(props: Mapping[str, str], key: str, channels: int, positive: bool) -> tuple[float, ...]:
    raw = props[key]
    value = _json(key, raw)
    rule = "finite numbers in (0, 1]" if positive else "finite numbers in [0, 1]"
    if not isinstance(value, list) or len(value) != channels:
        raise _bad(key, raw, f"must be a JSON list of {channels} numbers (channels = {channels}), {rule} pixel units")
    for v in value:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or not (0 < v <= 1 if positive else 0 <= v <= 1):
            raise _bad(key, raw, f"every value must be one of {channels} {rule} pixel units; found {v!r}"
                       + (" (normalising divides by it)" if positive else ""))
    return tuple(float(v) for v in value)


def _classes(props: Mapping[str, str]) -> tuple[str, ...]:
    raw = props["classes"]
    value = _json("classes", raw)
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CLASSES:
        raise _bad("classes", raw, f"must be a JSON list of 1 to {MAX_CLASSES:,} class names")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_CLASS_NAME:
            raise _bad("classes", raw, f"class {i} is {type(name).__name__} {str(name)[:40]!r}; every class name must "
                                       f"be a string of 1 to {MAX_CLASS_NAME} characters")
    if len(set(value)) != len(value):
        seen: set[str] = set()
        twice = next(n for n in value if n in seen or seen.add(n))
        raise _bad("classes", raw, f"class name {twice[:40]!r} appears more than once")
    return tuple(value)


def _text(props: Mapping[str, str], key: str, allowed: Sequence[str] | None = None) -> str:
    raw = props[key]
    if allowed is not None and raw not in allowed:
        raise _bad(key, raw, f"must be one of {', '.join(allowed)}")
    if len(raw) > MAX_TEXT:
        raise _bad(key, raw, f"longer than {MAX_TEXT} characters")
    return raw


def parse_metadata(props: Mapping[str, str]) -> ModelMetadata:
    """``ModelMetadata`` of a model's ``metadata_props`` (other keys are ignored). Raises ``MetadataError``, one
    line naming the key, for no kdprune metadata at all, a missing key or a malformed value."""
    if not any(k in props for k in METADATA_KEYS):
        raise MetadataError(f"no kdprune metadata (metadata_props has none of {', '.join(METADATA_KEYS[:4])}, ...): "
                            f"not a model kdprune exported, or exported before it wrote its preprocessing")
    for key in METADATA_KEYS:
        if key not in props:
            raise MetadataError(f"metadata_props[{key!r}] is missing (the kdprune metadata keys are "
                                f"{', '.join(METADATA_KEYS)})")
        if not isinstance(props[key], str):
            raise MetadataError(f"metadata_props[{key!r}] is {type(props[key]).__name__}, not a string")
        if len(props[key]) > MAX_VALUE:
            raise _bad(key, props[key], f"longer than {MAX_VALUE:,} characters")
    image_size = _int(props, "image_size", 1, MAX_SIDE, "the side of the square input, pixels")
    resize_size = _int(props, "resize_size", image_size, MAX_SIDE,
                       "the shorter side before the centre crop: at least image_size")
    channels = _int(props, "channels", 1, 3, "1 or 3")
    if channels == 2:
        raise _bad("channels", props["channels"], "must be 1 (grayscale) or 3 (RGB)")
    return ModelMetadata(
        image_size=image_size, resize_size=resize_size,
        interpolation=_text(props, "interpolation", INTERPOLATIONS), channels=channels,
        mean=_floats(props, "mean", channels, positive=False), std=_floats(props, "std", channels, positive=True),
        classes=_classes(props), dataset=_text(props, "dataset"),
        input_name=_nonempty(props, "input_name"), output_name=_nonempty(props, "output_name"),
        kdprune_version=_text(props, "kdprune_version"), kdprune_commit=_text(props, "kdprune_commit"),
        variant=_text(props, "variant"), quantization=_text(props, "quantization", QUANTIZATIONS),
        preprocessing=_text(props, "preprocessing"))


def _nonempty(props: Mapping[str, str], key: str) -> str:
    raw = _text(props, key)
    if not raw:
        raise _bad(key, raw, "must name the graph's " + ("input" if key == "input_name" else "output"))
    return raw
