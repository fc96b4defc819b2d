"""kdprune checkpoints: the architecture spec + state_dict (+ masks, + metadata), never a pickled module.

Loading checks the stored spec before anything is built (a known arch, a consistent structure, bounded
sizes), rebuilds the module from it (kdprune.models) and loads the weights with ``weights_only=True``
(kdprune.io.torch_load). Also: the weights of a teacher a user brings (``state_dict_of``, ``load_weights``: at most
``MAX_IMPORT_BYTES``, floating-point and finite; float64/float16/bfloat16 converted to the model's dtype, said)."""
from __future__ import annotations

import os

import torch

from kdprune.io import CheckpointError, torch_load, torch_save
from kdprune.models import build_model, check_spec, is_zoo, spec_of
from kdprune.models.zoo import spec_width
from kdprune.schema import show


CHECKPOINT_FORMAT = "kdprune-checkpoint-v1"
MAX_IMPORT_BYTES = 16 << 30
"""The largest teacher file ``state_dict_of`` reads: 4 billion float32 values (torchvision's largest classifier,
ViT-H/14 with SWAG weights, is 2.5 GB; kdprune's specs allow at most 250M parameters, 1 GB)."""


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, masks: dict | None = None,
                    meta: dict | None = None) -> None:
    """Save the arch spec + state_dict (+ masks, + metadata). Never a pickled module."""
    torch_save(path, {
        "format": CHECKPOINT_FORMAT,
        "spec": spec_of(model),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "masks": {k: v.cpu() for k, v in masks.items()} if masks else None,
        "meta": meta or {},
    })


def load_checkpoint(path: str | os.PathLike, expect_classes: int | None = None, expect_model=None,
                    allowed_factory: str | None = None):
    """Rebuild the model from a checkpoint. Returns ``(model, masks, meta)``.

    The stored spec is checked (:func:`kdprune.models.check_spec`: a known arch, a consistent structure,
    bounded sizes) before anything is built. ``expect_model`` (``params.model``): the checkpoint must hold
    that model (:func:`check_spec_matches`). ``allowed_factory``: the validated ``model.factory`` of
    params.yaml; a checkpoint whose spec names another custom factory is refused before anything is
    imported (kdprune.models.custom)."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a kdprune checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [k for k in ("spec", "state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint has no {' and no '.join(missing)}; the file is damaged")
    spec, meta = ckpt["spec"], ckpt.get("meta") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: meta is a {type(meta).__name__}, expected a dict; the file is damaged")
    try:
        check_spec(spec)
    except ValueError as e:
        raise CheckpointError(f"{path}: its architecture spec is not one kdprune can build: {e}") from None
    if expect_classes is not None and spec["num_classes"] != expect_classes:
        raise CheckpointError(
            f"{path}: the model has {spec['num_classes']} output classes but the dataset has "
            f"{expect_classes}; it was trained on another dataset (meta: {meta.get('dataset')})")
    if expect_model is not None:
        check_spec_matches(spec, expect_model, path)
    try:
        model = build_model(spec, allowed_factory=allowed_factory)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: weights do not match the stored architecture spec: {first}") from None
    masks = ckpt.get("masks")
    if masks:
        if not isinstance(masks, dict) or not all(isinstance(m, torch.Tensor) for m in masks.values()):
            raise CheckpointError(f"{path}: masks must be a dict of tensors; the file is damaged")
        shapes = {n: p.shape for n, p in model.named_parameters()}
        bad = [n for n, m in masks.items() if n not in shapes or shapes[n] != m.shape]
        if bad:
            raise CheckpointError(f"{path}: masks do not match the model's parameters: {bad[:3]}")
    return model, masks, meta


def check_spec_matches(spec: dict, model_params, path: str | os.PathLike) -> None:
    """CheckpointError unless the (checked) ``spec`` is of ``model_params``' arch, depth and width.

    A stage that loads the teacher calls this (via ``load_checkpoint(expect_model=params.model)``): a
    teacher trained for other ``model`` params would otherwise be pruned and distilled silently."""
    if is_zoo(spec):
        stored = {"arch": spec["arch"], "depth": spec["depth"], "width": spec_width(spec)}
        what = f"{spec['arch']} depth {spec['depth']} width {stored['width']}"
    elif spec["arch"] == "torchvision":
        stored, what = {"arch": spec["arch"], "name": spec["name"]}, f"torchvision {spec['name']}"
    else:
        stored = {"arch": spec["arch"], "factory": spec["factory"], "kwargs": spec["kwargs"]}
        what = f"custom {spec['factory']}"
    for field, value in stored.items():
        wanted = getattr(model_params, field)
        if value != wanted:
            raise CheckpointError(
                f"{path} was trained as {what}, but model.{field} is {show(wanted)} (the file has "
                f"{show(value)}); run `dvc repro` (or `dvc exp run`) to retrain it")


def state_dict_of(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights in ``path``: a kdprune checkpoint, or what a plain script writes with
    ``torch.save(model.state_dict(), path)`` (also inside ``{"state_dict": ...}`` or ``{"model": ...}``, and with
    DDP's ``module.`` prefix). Loaded with ``weights_only=True``."""
    obj = torch_load(path, max_bytes=MAX_IMPORT_BYTES)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj.get("state_dict")
    elif isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in obj.items())):
        raise CheckpointError(f"{path}: neither a kdprune checkpoint nor a state_dict (a mapping of names to "
                              "tensors, as torch.save(model.state_dict(), path) writes)")
    if all(k.startswith("module.") for k in obj):  # saved from a DDP- or DataParallel-wrapped model
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _first(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


WIDENED = (torch.float16, torch.bfloat16, torch.float64)  # floating dtypes converted to the model's, with a note


def _checked_dtypes(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                    source: str) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` with every floating tensor in the dtype of the model's own (``load_state_dict`` would cast it
    silently), and a note naming what was converted ("" when nothing was). Refused, naming the key and dtype: an
    integer, bool or complex tensor for a floating parameter or buffer (an int8-quantised file cast to float is
    nonsense: its teacher scored 10 %), and NaN or infinite values (also after a float64 value is narrowed)."""
    converted: dict[torch.dtype, list[str]] = {}
    out = dict(state)
    for k, mine in own.items():
        theirs = state.get(k)
        if theirs is None or not mine.is_floating_point():
            continue
        if theirs.is_complex() or not theirs.is_floating_point():
            raise CheckpointError(f"{source}: {k} is {str(theirs.dtype).removeprefix('torch.')}, but the model's "
                                  f"{k} is {str(mine.dtype).removeprefix('torch.')}: kdprune imports floating-point "
                                  f"weights only (float32, float16, bfloat16 or float64), never quantised, integer or "
                                  f"complex ones; export the teacher's float weights")
        if not bool(torch.isfinite(theirs).all()):
            bad = int((~torch.isfinite(theirs)).sum())
            raise CheckpointError(f"{source}: the imported weights hold NaN or infinite values ({k}: {bad:,} of "
                                  f"{theirs.numel():,}); the file's weights are broken (the run that wrote them "
                                  f"diverged?), not kdprune's training: export them again from a good run")
        if theirs.dtype != mine.dtype:
            cast = theirs.to(mine.dtype)
            if not bool(torch.isfinite(cast).all()):
                raise CheckpointError(f"{source}: {k} ({str(theirs.dtype).removeprefix('torch.')}) holds values "
                                      f"beyond the range of {str(mine.dtype).removeprefix('torch.')}, the model's dtype; "
                                      f"the file's weights are broken")
            out[k] = cast
            converted.setdefault(theirs.dtype, []).append(k)
    note = "; ".join(f"{len(keys)} {str(dt).removeprefix('torch.')} tensors ({_first(keys, 2)}) converted to "
                     f"{str(own[keys[0]].dtype).removeprefix('torch.')}" for dt, keys in converted.items())
    return out, note


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> str:
    """``model.load_state_dict(state)`` with every mismatch named: missing and unexpected keys, then shapes, then
    dtypes (:func:`_checked_dtypes`). Returns a note on the floating tensors converted to the model's dtype
    (float16, bfloat16, float64 -> float32), "" when none was: the caller logs it."""
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    shapes = [f"{k} {tuple(state[k].shape)} vs the model's {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:3])})")
    if problems:
        raise CheckpointError(f"{source}: the weights do not fit the model of params.yaml: " + ", ".join(problems)
                              + "; is model.arch / model.name / the data's class count the one it was trained with?")
    state, note = _checked_dtypes(own, state, source)
    model.load_state_dict(state, strict=True)
    return note
