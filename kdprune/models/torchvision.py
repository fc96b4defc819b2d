"""Any classification builder of ``torchvision.models`` (``model.arch: torchvision``, ``model.name``).

Spec: ``{"arch": "torchvision", "name": "resnet18", "num_classes": 10, "in_channels": 1}`` (plus
``"pruning"`` once channels were removed: kdprune.models.history). The builder is called as
``torchvision.models.get_model(name, weights=None, num_classes=...)``, so the module is exactly torchvision's
and its ``state_dict`` keys are the ones a user script saves with ``torch.save(model.state_dict(), path)``.

Single-channel data (MNIST, Fashion-MNIST, grey images): torchvision's stems take 3 channels, so
kdprune.models installs a forward pre-hook that repeats the one channel three times (``in_channels: 1``).
The weights are untouched, a pretrained stem sees what it expects, and the repeat is part of the forward
pass, so an ONNX export includes it.

``pretrained_state_dict`` loads torchvision's own weights (its weights enum, ``DEFAULT``) from torch's hub
cache only; it never downloads, so it can never hang offline: a missing file is an error that says
which file and where torch expects it.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kdprune.io import CheckpointError, torch_load


@functools.lru_cache(maxsize=1)
def classifiers() -> tuple[str, ...]:
    """The classification builders of the installed torchvision (all take ``num_classes``)."""
    import torchvision  # heavy: torchvision is imported only where it is used

    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_name(name: Any) -> None:
    if not isinstance(name, str) or name not in classifiers():
        raise ValueError(f"unknown torchvision model {name!r}; the classification builders of torchvision.models "
                         f"are: {', '.join(classifiers())}")


def build(name: str, num_classes: int) -> nn.Module:
    import torchvision  # heavy: torchvision is imported only where it is used

    check_name(name)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def weights_of(name: str):
    """torchvision's DEFAULT weights enum entry of builder ``name``."""
    import torchvision  # heavy: torchvision is imported only where it is used

    check_name(name)
    return torchvision.models.get_model_weights(name).DEFAULT


def weights_file(name: str) -> Path:
    """Where torch's hub cache keeps the DEFAULT weights of ``name``: ``torch.hub.get_dir()/checkpoints/<file>``."""
    url = weights_of(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def pretrained_state_dict(name: str) -> tuple[dict[str, torch.Tensor], int]:
    """(state_dict, number of classes) of torchvision's DEFAULT weights of ``name``, from the hub cache only."""
    weights = weights_of(name)
    path = weights_file(name)
    if not path.is_file():
        raise CheckpointError(
            f"teacher.init pretrained: torchvision's weights for {name} ({weights}) are not in torch's cache: "
            f"{path} is missing. Offline, download {weights.url} elsewhere and copy it to that path "
            f"(the cache is $TORCH_HOME/hub/checkpoints, TORCH_HOME defaulting to ~/.cache/torch)")
    state = torch_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state_dict")
    return state, len(weights.meta.get("categories") or [])
