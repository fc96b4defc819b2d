"""Resume state of a training run: its fingerprint (everything the run depends on), the RNG states, and the
checks that decide whether a resume file belongs to this run (see kdprune/train/loop.py)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from kdprune import io
from kdprune.models import spec_of
from kdprune.prune.agp import AGPSchedule
from kdprune.prune.masks import Masks
from kdprune.train import distributed


RESUME_FORMAT = "kdprune-resume-v1"


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def spec_or_none(model: nn.Module | None) -> dict | None:
    """The model's spec (kdprune.models), None for a module built elsewhere."""
    try:
        return spec_of(model) if model is not None else None
    except ValueError:
        return None


def run_fingerprint(model: nn.Module, train_loader, test_loader, cfg, runtime, teacher, alpha: float,
                    temperature: float, masks: Masks | None, at_beta: float = 0.0,
                    prune_schedule: AGPSchedule | None = None, at_layers: list[str] | None = None) -> str:
    """Identity of everything a training run depends on; a resume checkpoint is only used when it matches."""
    h = hashlib.sha256()
    cfg_d = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_every"}
    extra = {"at_layers": at_layers} if at_beta > 0 else {}
    h.update(json.dumps({"cfg": cfg_d, "runtime": dataclasses.asdict(runtime), "alpha": alpha,
                         "temperature": temperature, "spec": spec_or_none(model), **extra,
                         "teacher_spec": spec_or_none(teacher) if alpha > 0 or at_beta > 0 else None,
                         "at_beta": at_beta, "agp": prune_schedule.config() if prune_schedule else None,
                         "loader": [getattr(train_loader, a, None) for a in ("batch_size", "pad", "hflip")],
                         "device": next(model.parameters()).device.type, "world_size": distributed.world_size()},
                        sort_keys=True, default=str).encode())
    for _, t in sorted(model.state_dict().items()):
        _hash_tensor(h, t)
    if teacher is not None and (alpha > 0 or at_beta > 0):
        for _, t in sorted(teacher.state_dict().items()):
            _hash_tensor(h, t)
    for _, m in sorted((masks or {}).items()):
        _hash_tensor(h, m)
    for loader in (train_loader, test_loader):
        for a in ("x", "y", "mean", "inv_std", "index_digest"):  # index_digest: the files of a StreamLoader
            if isinstance(getattr(loader, a, None), torch.Tensor):
                _hash_tensor(h, getattr(loader, a))
    gen = getattr(train_loader, "generator", None)
    if gen is not None:
        _hash_tensor(h, gen.get_state())
    return h.hexdigest()


def rng_state(train_loader) -> dict[str, Any]:
    py = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    gen = getattr(train_loader, "generator", None)
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
            "torch": torch.get_rng_state(),
            "loader": gen.get_state() if gen is not None else None}


def set_rng_state(state: dict[str, Any], train_loader) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["loader"] is not None:
        train_loader.generator.set_state(state["loader"])


def load_resume(path: Path, fingerprint: str, name: str, log: Callable[[str], None]) -> dict | None:
    """The resume state at ``path`` if it belongs to this run; otherwise None (and say why)."""
    if not path.exists():
        return None
    try:
        state = io.torch_load(path)
    except io.CheckpointError as e:
        log(f"{name}: ignoring resume checkpoint: {e}; starting from epoch 0")
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log(f"{name}: ignoring {path}: not a kdprune resume checkpoint; starting from epoch 0")
        return None
    if state.get("fingerprint") != fingerprint:
        log(f"{name}: ignoring stale {path}: it was written for other params or inputs; starting from epoch 0")
        return None
    return state
