"""Atomic file writes and safe checkpoint loading.

Every file a stage produces goes through these helpers: the content is written to a temp file
in the destination directory and then moved into place with ``os.replace``, so a killed process
leaves either the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch is imported where it is used: stages/validate.py imports this module without it
    import torch


from kdprune.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unsafe, corrupted or does not fit the expected model."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success move it over ``path`` atomically.

    Temp files of an earlier write of the same path that was killed (SIGKILL leaves them behind) are
    removed first, so repeated kills do not fill the disk. One writer per output path is assumed,
    which DVC guarantees (one stage owns each output).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed earlier write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    # Save through a file object: given a path, torch.save names the zip archive's records after the
    # file, and the random temp name would make every save differ (non-deterministic DVC hashes).
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch file with ``weights_only=True``: tensors and plain containers only, never code."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for unsafe or broken files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: {msg}. kdprune only loads tensors and plain containers "
            "(torch.load(weights_only=True)); the file is corrupted, truncated, or holds "
            "pickled objects that could run code."
        ) from None


CHECKPOINT_FORMAT = "kdprune-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, masks: dict | None = None,
                    meta: dict | None = None) -> None:
    """Save the arch spec + state_dict (+ masks, + metadata). Never a pickled module."""
    from kdprune.models import spec_of

    torch_save(path, {
        "format": CHECKPOINT_FORMAT,
        "spec": spec_of(model),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "masks": {k: v.cpu() for k, v in masks.items()} if masks else None,
        "meta": meta or {},
    })


def load_checkpoint(path: str | os.PathLike, expect_classes: int | None = None, allowed_factory: str | None = None):
    """Rebuild the model from a checkpoint. Returns ``(model, masks, meta)``.

    ``allowed_factory``: the validated ``model.factory`` of params.yaml; a checkpoint whose spec names another
    custom factory is refused before anything is imported (kdprune.models.custom)."""
    from kdprune.models import build_model

    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a kdprune checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    spec = ckpt.get("spec")
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: the checkpoint has no model spec")
    if expect_classes is not None and spec.get("num_classes") != expect_classes:
        raise CheckpointError(
            f"{path}: the model has {spec.get('num_classes')} output classes but the dataset has "
            f"{expect_classes}; it was trained on another dataset (meta: {ckpt.get('meta', {}).get('dataset')})")
    try:
        model = build_model(spec, allowed_factory=allowed_factory)
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: weights do not match the stored architecture spec: {first}") from None
    masks = ckpt.get("masks")
    if masks:
        shapes = {n: p.shape for n, p in model.named_parameters()}
        bad = [n for n, m in masks.items() if n not in shapes or shapes[n] != m.shape]
        if bad:
            raise CheckpointError(f"{path}: masks do not match the model's parameters: {bad[:3]}")
    return model, masks, ckpt.get("meta", {})


def state_dict_of(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights in ``path``: a kdprune checkpoint, or what a plain script writes with
    ``torch.save(model.state_dict(), path)`` (also inside ``{"state_dict": ...}`` or ``{"model": ...}``, and with
    DDP's ``module.`` prefix). Loaded with ``weights_only=True``."""
    import torch

    obj = torch_load(path)
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


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` with every mismatch named: missing and unexpected keys, then shapes."""
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
    model.load_state_dict(state, strict=True)
