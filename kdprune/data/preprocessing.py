"""Preprocessing that matches the teacher: the normalisation a model was trained with.

An imported teacher keeps its accuracy only when it is fed the inputs it was trained on. Two sources:

- ``data.mean`` / ``data.std`` (lists, one value per channel, in [0, 1] pixel units): override the statistics
  that prepare computes from the train split (``override_stats``), for every dataset;
- torchvision's pretrained weights: ``pretrained_preprocessing(weights)`` reads the weights' own eval
  transforms (``weights.transforms()``, available offline: nothing is downloaded) as
  ``(resize_size, crop_size, mean, std)``, i.e. ``data.resize_size``, ``data.image_size``, ``data.mean`` and
  ``data.std`` of an image folder; ``pretrained_interpolation(weights)`` gives ``data.interpolation``
  (EfficientNet's weights, for one, were evaluated with bicubic resizing).

This module imports no torch at module level.
"""
from __future__ import annotations

import math
from typing import Any

from kdprune.params import DEFAULT_IMAGE_SIZE, DataParams, ParamsError


def override_stats(computed: tuple[list[float], list[float]], mean: list[float] | None, std: list[float] | None,
                   channels: int) -> tuple[list[float], list[float]]:
    """``(mean, std)`` for normalisation: ``data.mean``/``data.std`` where set, else the computed ones. A set
    list must have one value per channel of the prepared images."""
    out = []
    for key, given, calc in (("mean", mean, computed[0]), ("std", std, computed[1])):
        if given is None:
            out.append(list(calc))
            continue
        if len(given) != channels:
            raise ParamsError(f"params.yaml: data.{key} = {list(given)} is invalid: the prepared images have "
                              f"{channels} channel{'s' if channels != 1 else ''}, so it needs {channels} "
                              f"value{'s' if channels != 1 else ''} (or null: computed from the train split)")
        values = [float(v) for v in given]
        if key == "std" and not all(math.isfinite(v) and v > 0 for v in values):  # the params check this too
            raise ParamsError(f"params.yaml: data.std = {values} is invalid: every value must be a finite number "
                              f"above 0 (normalising divides by it)")
        out.append(values)
    return out[0], out[1]


def _weights(weights: Any):
    """A torchvision weights enum member, from the member itself or its name ('ResNet50_Weights.IMAGENET1K_V2')."""
    if isinstance(weights, str):
        from torchvision.models import get_weight  # heavy: torchvision is imported only where it is used

        try:
            return get_weight(weights)
        except (ValueError, KeyError, AttributeError) as e:
            raise ParamsError(f"torchvision weights {weights!r}: unknown ({str(e).splitlines()[0][:200]}); "
                              f"write them as '<Model>_Weights.<NAME>', e.g. 'ResNet50_Weights.IMAGENET1K_V2'") \
                from None
    return weights


INTERPOLATIONS = ("bilinear", "bicubic")  # = kdprune.params DataParams.interpolation


def _classification_transforms(weights: Any):
    w = _weights(weights)
    transforms = getattr(w, "transforms", None)
    if transforms is None:
        raise ParamsError(f"{weights!r} is not a torchvision weights enum member (it has no transforms())")
    t = transforms()
    need = ("resize_size", "crop_size", "mean", "std", "interpolation")
    if not all(hasattr(t, a) for a in need):
        raise ParamsError(f"{w}: its transforms ({type(t).__name__}) are not an image-classification preset "
                          f"with {list(need)}")
    if len(t.resize_size) != 1 or len(t.crop_size) != 1:
        raise ParamsError(f"{w}: transforms resize {list(t.resize_size)}, crop {list(t.crop_size)}: kdprune's image "
                          f"folders resize the shorter side (one size) and crop a square")
    return w, t


def pretrained_preprocessing(weights: Any) -> tuple[int, int, list[float], list[float]]:
    """``(resize_size, crop_size, mean, std)`` of torchvision ``weights``' eval transforms: resize the shorter side
    to ``resize_size`` (antialiased, with ``pretrained_interpolation(weights)``), centre-crop ``crop_size``,
    normalise with ``mean``/``std``: ``data.resize_size``, ``data.image_size``, ``data.mean``, ``data.std``.

    ``weights``: a weights enum member (``ResNet50_Weights.IMAGENET1K_V2``) or its name. Only classification
    weights (``ImageClassification`` transforms: one resize size, a square crop) are accepted."""
    _, t = _classification_transforms(weights)
    return int(t.resize_size[0]), int(t.crop_size[0]), [float(v) for v in t.mean], [float(v) for v in t.std]


def pretrained_interpolation(weights: Any) -> str:
    """The resize interpolation of ``weights``' transforms, as ``data.interpolation`` spells it (``bilinear`` for
    most torchvision weights, ``bicubic`` for EfficientNet and the ViT/Swin families)."""
    w, t = _classification_transforms(weights)
    name = getattr(t.interpolation, "value", str(t.interpolation)).lower()
    if name not in INTERPOLATIONS:
        raise ParamsError(f"{w}: interpolation {name!r}; kdprune's image folders resize with {list(INTERPOLATIONS)}")
    return name


def folder_settings(data: DataParams, weights: Any = None) -> dict[str, Any]:
    """The preprocessing of an image folder: ``image_size``, ``resize_size``, ``interpolation``, ``mean``, ``std``.

    Each ``data.*`` key that is set wins; a null one takes the value of torchvision ``weights``' transforms when
    a pretrained teacher gives them (``teacher.init: pretrained``), else its default: 224, ``image_size``,
    bilinear, and ``None`` for mean/std (computed from the train split)."""
    resize = crop = interpolation = mean = std = None
    if weights is not None:
        resize, crop, mean, std = pretrained_preprocessing(weights)
        interpolation = pretrained_interpolation(weights)
    image_size = data.image_size if data.image_size is not None else (crop or DEFAULT_IMAGE_SIZE)
    if data.resize_size is not None:
        resize = data.resize_size
    elif data.image_size is not None or resize is None:  # a size set by hand: the weights' resize would not fit it
        resize = image_size
    return {"image_size": image_size, "resize_size": resize,
            "interpolation": data.interpolation or interpolation or "bilinear",
            "mean": data.mean if data.mean is not None else mean, "std": data.std if data.std is not None else std}
