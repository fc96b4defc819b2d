"""Every model kdprune compresses, described by a *spec*: a plain dict stored next to the weights.

Three kinds (``model.arch`` in params.yaml):

- the zoo (``resnet``, ``resnet_bottleneck``, ``resnet_imagenet``): kdprune's CIFAR-style ResNets,
  kdprune/models/zoo.py, whose spec lists every channel count;
- ``torchvision``: any classification builder of ``torchvision.models`` (kdprune/models/torchvision.py);
- ``custom``: the user's own ``nn.Module`` from ``model.factory`` (kdprune/models/custom.py; runs their code).

Specs of the last two::

    {"arch": "torchvision", "name": "resnet18", "num_classes": 10, "in_channels": 1}
    {"arch": "custom", "factory": "pkg.mod:fn", "kwargs": {...}, "num_classes": 10, "in_channels": 3}

plus, once ``prune.method: channel`` removed channels, ``"pruning"``: Torch-Pruning's pruning history,
replayed on a freshly built model (kdprune/models/history.py). A zoo model's spec instead lists its new
channel counts (``zoo.spec_of``). Either way a pruned model is rebuilt from plain data, never unpickled.

``in_channels: 1`` on a torchvision model (or a custom one whose factory takes no ``in_channels``) installs a
forward pre-hook that repeats the single channel to 3: the state_dict keys stay exactly torchvision's.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from kdprune.io import CheckpointError
from kdprune.models import custom, history, zoo
from kdprune.models import torchvision as tvmodels
from kdprune.models.zoo import (BOTTLENECK_ARCHS, MAX_PARAMS, SPEC_KEYS, BasicBlock, Bottleneck, ResNet,  # noqa: F401
                                model_spec, resnet_spec, spec_param_count, spec_width)
from kdprune.archs import ARCHS

SPEC_ATTR = "kdprune_spec"  # where a torchvision or custom module keeps its spec
MAX_CLASSES = 1_000_000
SPEC_KEYS_OF = {"torchvision": {"arch", "name", "num_classes", "in_channels"},
                "custom": {"arch", "factory", "kwargs", "num_classes", "in_channels"}}


def is_zoo(spec: dict[str, Any]) -> bool:
    return spec.get("arch") in ARCHS


def check_spec(spec: Any) -> None:
    """Raise ValueError naming the first thing in ``spec`` that does not describe a model kdprune builds."""
    if not isinstance(spec, dict):
        raise ValueError(f"a model spec must be a dict, got {type(spec).__name__}")
    arch = spec.get("arch")
    if arch not in SPEC_KEYS_OF:
        zoo.check_spec(spec)
        return
    keys = SPEC_KEYS_OF[arch]
    if not keys <= set(spec) <= keys | {"pruning"}:
        raise ValueError(f"spec of arch {arch!r} has keys {sorted(map(str, spec))}; expected {sorted(keys)} "
                         "(+ 'pruning')")
    n, c = spec["num_classes"], spec["in_channels"]
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CLASSES):
        raise ValueError(f"spec num_classes = {str(n)[:40]}: must be an integer in [1, {MAX_CLASSES}]")
    if not (isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 64):
        raise ValueError(f"spec in_channels = {str(c)[:40]}: must be an integer in [1, 64]")
    if arch == "torchvision":
        tvmodels.check_name(spec["name"])
        if c not in (1, 3):
            raise ValueError(f"spec in_channels = {c}: torchvision models take 3 channels (1 is repeated to 3)")
    else:
        custom.check(spec["factory"], spec["kwargs"])
    if "pruning" in spec:
        history.check(spec["pruning"], c)


def _repeat_to_rgb(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: a single-channel batch becomes 3 identical channels (torchvision stems take RGB)."""
    return (args[0].repeat(1, 3, 1, 1), *args[1:])


def build_model(spec: dict[str, Any], allowed_factory: str | None = None) -> nn.Module:
    """The module a spec describes (ValueError naming what is wrong with an invalid spec).

    ``allowed_factory``: the validated ``model.factory`` of params.yaml. A custom spec is built only when its
    factory equals it; otherwise CheckpointError, and nothing is imported.
    """
    check_spec(spec)
    if is_zoo(spec):
        return zoo.build_model(spec)
    spec = copy.deepcopy(spec)
    if spec["arch"] == "torchvision":
        model, takes_channels = tvmodels.build(spec["name"], spec["num_classes"]), False
    else:
        model, takes_channels = custom.build(spec["factory"], spec["kwargs"], spec["num_classes"],
                                             spec["in_channels"], allowed_factory)
    if spec["in_channels"] == 1 and not takes_channels:
        model.register_forward_pre_hook(_repeat_to_rgb)
    if "pruning" in spec:
        history.replay(model, spec["pruning"])
    setattr(model, SPEC_ATTR, spec)
    return model


def spec_of(model: nn.Module) -> dict[str, Any]:
    """The spec of ``model`` as it is now (a zoo model's channel counts are read from its modules)."""
    if isinstance(model, ResNet):
        return zoo.spec_of(model)
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:  # a module that carries its spec itself (checkpoints of the first kdprune models)
        spec = getattr(model, "spec", None)
    if not isinstance(spec, dict):
        raise ValueError(f"{type(model).__name__} was not built by kdprune.models.build_model: it has no spec")
    return copy.deepcopy(spec)


def record_pruning(model: nn.Module, steps: list[list], input_shape: tuple[int, ...]) -> None:
    """After channel pruning of a torchvision or custom model: append Torch-Pruning's ``steps`` (plain lists,
    history.recorded) to its spec, so ``build_model(spec_of(model))`` rebuilds the pruned architecture. A zoo
    model needs nothing: its spec is read from its modules."""
    if isinstance(model, ResNet) or not steps:
        return
    spec = spec_of(model)
    old = spec.get("pruning")
    if old is not None and list(old["input_shape"]) != list(input_shape):
        raise ValueError(f"the model was pruned at input shape {old['input_shape']}, now at {list(input_shape)}")
    spec["pruning"] = {"input_shape": [int(s) for s in input_shape],
                       "history": (old["history"] if old else []) + [list(s) for s in steps]}
    check_spec(spec)
    setattr(model, SPEC_ATTR, spec)


def spec_from_params(model_params, in_channels: int, num_classes: int) -> dict[str, Any]:
    """Spec of the unpruned model that ``params.yaml``'s ``model`` section describes."""
    arch = model_params.arch
    if arch == "torchvision":
        return {"arch": arch, "name": model_params.name, "num_classes": num_classes, "in_channels": in_channels}
    if arch == "custom":
        return {"arch": arch, "factory": model_params.factory, "kwargs": dict(model_params.kwargs),
                "num_classes": num_classes, "in_channels": in_channels}
    return zoo.spec_from_params(model_params, in_channels, num_classes)




def layer_names(model: nn.Module, limit: int = 12) -> list[str]:
    """A few module names of ``model`` (the top-level and second-level ones first), for error messages."""
    names = [n for n, _ in model.named_modules() if n]
    return sorted(names, key=lambda n: n.count("."))[:limit]  # stable: module order within a depth
