"""The outputs of named layers, captured with forward hooks: what attention transfer compares.

``distill.at_layers`` names modules as ``model.named_modules()`` spells them (``layer3``, ``features.6``). The
zoo's default is its residual stages (``layer1`` .. ``layerN``), whose outputs are exactly what
``ResNet.forward(return_features=True)`` returns; any other model must name its layers. Hooks work on any
``nn.Module``, also inside DDP (the hooks sit on the wrapped module).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprune.errors import UserError


class FeatureError(UserError, ValueError):
    """``distill.at_layers`` does not fit the model (unknown names, or outputs that are not feature maps)."""


def default_layers(model: nn.Module) -> list[str]:
    """The zoo's residual stages; other models have no default."""
    stages = getattr(model, "num_stages", None)
    if not isinstance(stages, int) or not hasattr(model, "stages"):
        raise FeatureError("distill.at_layers is empty: attention transfer on a torchvision or custom model needs the "
                           "module names whose outputs it compares; some of this model's: "
                           + ", ".join(_some_names(model)))
    return [f"layer{i}" for i in range(1, stages + 1)]


def _some_names(model: nn.Module, limit: int = 12) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    return sorted(names, key=lambda n: n.count("."))[:limit]


def check_layers(names: list[str], *models: nn.Module) -> None:
    """Every name is a module of every model (student and teacher), else one line listing some valid names."""
    for model in models:
        have = dict(model.named_modules())
        missing = [n for n in names if n not in have or not n]
        if missing:
            raise FeatureError(f"distill.at_layers: {missing[:3]} not among the model's modules; some valid names: "
                               + ", ".join(_some_names(model)))


class LayerTap:
    """Forward hooks that keep the latest output of each named layer; ``take()`` returns them in order."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.names = list(names)
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.out[name] = output
        return hook

    def take(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.out]
        if missing:
            raise FeatureError(f"distill.at_layers: {missing[:3]} did not run in the forward pass")
        bad = [n for n in self.names if not (isinstance(self.out[n], torch.Tensor) and self.out[n].ndim == 4)]
        if bad:
            raise FeatureError(f"distill.at_layers: {bad[:3]} output no (N, C, H, W) feature map; name conv blocks or "
                               "stages")
        feats = [self.out[n] for n in self.names]
        self.out = {}
        return feats

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
