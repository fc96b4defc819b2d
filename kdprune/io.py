"""Atomic file writes and safe checkpoint loading.

Every file a stage produces goes through these helpers: the content is written to a temp file
in the destination directory and then moved into place with ``os.replace``, so a killed process
leaves either the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch is imported where it is used: stages/validate.py imports this module without it
    import torch


from kdprune.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unsafe, corrupted or does not fit the expected model."""


class ExportError(UserError, RuntimeError):
    """A deployable export (kdprune.export: compact ``.kdc``, ONNX) could not be written, read back, or does
    not match the model. Defined here, beside the other file errors, so that kdprune.stage can list it
    without importing the exporters."""


class OutputError(OSError):
    """An output could not be written because the disk (or the quota) is full; the message names the file."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28] " prefix
        return self.strerror or super().__str__()


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind ``exc``, if any: torch's zip writer turns it into a RuntimeError
    ("unexpected pos"), but keeps the OSError of the failed ``write`` as the exception's context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _output_error(path: Path, err: OSError, size: int | None) -> OutputError:
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"needs {size:,} bytes, " if size is not None else ""
    return OutputError(err.errno, f"{path}: cannot write it: {os.strerror(err.errno)} ({need}{free} on its "
                                  "file system); free some space and rerun. The previous file, if any, is unchanged")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success move it over ``path`` atomically.

    Temp files of an earlier write of the same path that was killed (SIGKILL leaves them behind) are
    removed first, so repeated kills do not fill the disk. One writer per output path is assumed,
    which DVC guarantees (one stage owns each output).

    The file gets the mode a plain ``open(path, "w")`` would give (0666 minus the umask), not mkstemp's
    0600. A full disk (ENOSPC, EDQUOT) raises :class:`OutputError`, one line naming ``path`` and, when
    the caller passes it, the ``size`` in bytes it needed; the temp file is removed and the old ``path``
    is left as it was.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed earlier write
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException as e:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        full = _disk_full(e)
        if full is not None:
            raise _output_error(path, full, size) from None
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path, size=len(text.encode())) as tmp:
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


def load_checkpoint(path: str | os.PathLike, expect_classes: int | None = None, expect_model=None,
                    allowed_factory: str | None = None):
    """Rebuild the model from a checkpoint. Returns ``(model, masks, meta)``.

    The stored spec is checked (:func:`kdprune.models.check_spec`: a known arch, a consistent structure,
    bounded sizes) before anything is built. ``expect_model`` (``params.model``): the checkpoint must hold
    that model (:func:`check_spec_matches`). ``allowed_factory``: the validated ``model.factory`` of
    params.yaml; a checkpoint whose spec names another custom factory is refused before anything is
    imported (kdprune.models.custom)."""
    import torch

    from kdprune.models import build_model, check_spec

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
    from kdprune.models import is_zoo
    from kdprune.models.zoo import spec_width
    from kdprune.params import show

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
