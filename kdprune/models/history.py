"""What removed the channels of a channel-pruned torchvision or custom model, and its replay.

A spec's ``"pruning"`` entry is Torch-Pruning's pruning history (``DependencyGraph.pruning_history()``), plain
lists only, with the input shape its dependency graph was traced with::

    "pruning": {"input_shape": [3, 32, 32],
                "history": [["layer4.0.downsample.0", true, [3, 17, ...]],   # module, out-channels?, indices
                            ...]}

:func:`replay` rebuilds the pruned architecture on a freshly built model: it traces the dependency graph and
prunes each recorded group again, in order (what ``DependencyGraph.load_pruning_history`` does), after
checking every step: module names that exist and are prunable, indices that are distinct, in range, and
never all of a layer's channels. The weights then load into the rebuilt model with ``weights_only=True``:
no module is ever pickled (``torch_pruning.serialization`` pickles whole modules; kdprune does not use it).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator
from unittest import mock

import torch
import torch.nn as nn

MAX_STEPS = 100_000
MAX_INDICES = 50_000_000  # over all steps: more channel indices than any network has
MAX_SIDE = 1024  # the traced input is built before anything else is checked: bound its size
MAX_NAME = 500


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check(pruning: Any, in_channels: int) -> None:
    """ValueError naming the first thing in a spec's ``pruning`` entry that is not plain, bounded data."""
    if not isinstance(pruning, dict) or set(pruning) != {"input_shape", "history"}:
        raise ValueError("spec pruning must be {'input_shape': [C, H, W], 'history': [...]}")
    shape = pruning["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_int(s) and 1 <= s <= MAX_SIDE for s in shape)
            and shape[0] == in_channels):
        raise ValueError(f"spec pruning.input_shape = {str(shape)[:60]}: must be [{in_channels}, H, W], "
                         f"1 <= H, W <= {MAX_SIDE}")
    history = pruning["history"]
    if not isinstance(history, list) or len(history) > MAX_STEPS:
        raise ValueError(f"spec pruning.history must be a list of at most {MAX_STEPS} steps")
    total = 0
    for i, step in enumerate(history):
        ok = isinstance(step, list) and len(step) == 3
        if ok:
            name, out, idxs = step
            ok = (isinstance(name, str) and len(name) <= MAX_NAME and isinstance(out, bool) and isinstance(idxs, list)
                  and len(idxs) > 0)
        if not ok:
            raise ValueError(f"spec pruning.history[{i}] = {str(step)[:80]}: must be [module name, true/false, "
                             "[channel indices]]")
        total += len(idxs)
        if total > MAX_INDICES:
            raise ValueError(f"spec pruning.history holds more than {MAX_INDICES:,} channel indices")
        if not all(_int(j) and j >= 0 for j in idxs):
            raise ValueError(f"spec pruning.history[{i}]: channel indices must be integers >= 0")


SHUFFLENET = "torchvision.models.shufflenetv2"


@contextlib.contextmanager
def tracing(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Where Torch-Pruning's tracer needs help; yields the layers whose output channels must stay whole.

    ShuffleNet-V2's channel shuffle (a view / transpose / view in ``channel_shuffle``) permutes channels, which
    the dependency graph cannot map (Torch-Pruning fails with ZeroDivisionError). While the graph is traced
    the shuffle is an identity, and every conv whose output enters the shuffle (the last conv of each branch),
    or whose channels are tied to a shuffle's output (the depthwise conv that starts branch1 of a later stage),
    keeps its output channels, so no pruned group ever crosses a shuffle: only the channels inside a branch,
    the stem and the last conv are pruned. The model itself (its forward pass) is never changed."""
    blocks = [m for m in model.modules() if type(m).__module__ == SHUFFLENET and type(m).__name__ == "InvertedResidual"]
    if not blocks:
        yield []
        return
    keep = []
    for i, block in enumerate(blocks):
        for branch in (getattr(block, "branch1", None), getattr(block, "branch2", None)):
            convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)] if branch is not None else []
            keep.extend(convs[-1:])
            if i > 0 and branch is getattr(block, "branch1", None):
                keep.extend(convs[:1])  # a depthwise conv on the block's input, which comes from a shuffle
    with mock.patch.object(sys.modules[SHUFFLENET], "channel_shuffle", lambda x, groups: x):
        yield keep


def dependency_graph(model: nn.Module, example: torch.Tensor):
    """Torch-Pruning's dependency graph of ``model`` (with :func:`tracing`'s help) and the layers to keep whole."""
    import torch_pruning as tp  # heavy optional dependency: imported only when channels are removed

    with tracing(model) as keep:
        return tp.DependencyGraph().build_dependency(model, example, verbose=False), keep


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def replay(model: nn.Module, pruning: dict) -> None:
    """Prune ``model`` (freshly built, unpruned) in place as ``pruning`` records (see the module docstring)."""
    modules = _modules(model)
    was_training = model.training
    model.eval()
    dg, _ = dependency_graph(model, torch.zeros(1, *pruning["input_shape"]))
    for i, (name, out, idxs) in enumerate(pruning["history"]):
        module = modules.get(name)
        pruner = dg.get_pruner_of_module(module) if module is not None else None
        if pruner is None:
            raise ValueError(f"spec pruning.history[{i}]: the model has no prunable module {name[:100]!r}")
        have = pruner.get_out_channels(module) if out else pruner.get_in_channels(module)
        if have is None or len(set(idxs)) != len(idxs) or max(idxs) >= have or len(idxs) >= have:
            raise ValueError(f"spec pruning.history[{i}]: {name} has {have} {'out' if out else 'in'}put channels; "
                             f"the indices must be distinct, below it, and leave at least one")
        fn = pruner.prune_out_channels if out else pruner.prune_in_channels
        dg.get_pruning_group(module, fn, list(idxs)).prune(record_history=False)
    model.train(was_training)

