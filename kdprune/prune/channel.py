"""Structured channel pruning of any architecture (``prune.method: channel``) with Torch-Pruning.

Torch-Pruning traces the whole model into a dependency graph: every set of layers whose channels must shrink
together (a conv, its BN, the next conv's inputs, every branch of a residual addition or concatenation) is
one *group*. Each group loses ``prune.ratio`` of its channels, ranked by ``prune.importance``:

  =========  ==========================================================================================
  l1, l2     the L1 / L2 norm of each channel's weights over the whole group (``MagnitudeImportance``)
  taylor     |weight x gradient| of the loss on a few training batches (``TaylorImportance``)
  bn_scale   |gamma| of the BatchNorm that follows the channel (``BNScaleImportance``, network slimming)
  =========  ==========================================================================================

The classifier is kept whole: the layer whose output is the model's output (found by running the model)
keeps its output width; its inputs shrink with the layer before. With ``prune.target_macs_reduction`` (e.g.
2.0) the model is pruned in small steps until its MACs (at the data's input size) fall by that factor; the
caller reports what was reached. A ``prune.ratio`` at which some group would keep no channel (Torch-Pruning
would leave it whole: less compression than a lower ratio) is refused before anything is pruned (limits.py).
The pruned model is physically smaller; the returned history (``kdprune.models.history``) rebuilds it from a
fresh model.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdprune.errors import UserError
from kdprune.models.history import tracing
from kdprune.prune.counts import dense_macs
from kdprune.prune.limits import check_ratio, group_sizes
from kdprune.prune.masks import check_finite

TARGET_STEPS = 50  # target_macs_reduction: channel-ratio increments of MAX_RATIO / TARGET_STEPS
MAX_RATIO = 0.95


class ChannelPruningError(UserError, ValueError):
    """Torch-Pruning cannot prune this model as asked (an untraceable operation, or an unreachable target)."""


@dataclass
class ChannelPruneResult:
    history: list[list]  # Torch-Pruning's pruning history, plain lists (kdprune.models.history.recorded)
    macs_before: int
    macs_after: int
    ratio: float  # the channel ratio that was applied (the last step's with a MAC target)

    @property
    def mac_reduction(self) -> float:
        return self.macs_before / self.macs_after


def output_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The conv or linear layer that runs last in a forward pass: the classifier, kept whole."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ChannelPruningError("prune.method channel: the model has no conv or linear layer")
    return order[-1]


def importance(name: str):
    import torch_pruning as tp  # heavy optional dependency: imported only when channels are removed

    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    raise ValueError(f"unknown importance {name!r}")


def _gradients(model: nn.Module, batches: Iterable) -> None:
    """Accumulate the cross-entropy gradients of ``batches`` (Taylor importance reads weight x grad)."""
    model.zero_grad(set_to_none=True)
    n = 0
    for x, y in batches:
        F.cross_entropy(model(x).float(), y).backward()
        n += 1
    if n == 0:
        raise ChannelPruningError("prune.importance taylor needs training batches for its gradients")


def channel_prune(model: nn.Module, example: torch.Tensor, importance_name: str = "l1", ratio: float = 0.5,
                  target_macs_reduction: float | None = None,
                  batches: Callable[[], Iterable] | None = None) -> ChannelPruneResult:
    """Prune ``model`` in place (see the module docstring). ``example``: one input batch of the data's shape;
    ``batches``: yields (x, y) training batches, for ``taylor`` importance."""
    import torch_pruning as tp  # heavy optional dependency: imported only when channels are removed

    check_finite(model)
    if not 0 <= ratio < 1:
        raise ValueError(f"channel ratio {ratio} outside [0, 1)")
    shape = tuple(example.shape[1:])
    before = dense_macs(model, shape)
    if target_macs_reduction is None and ratio == 0:
        return ChannelPruneResult([], before, before, 0.0)
    was_training = model.training
    model.eval()
    ignored = [output_layer(model, example)]
    target = target_macs_reduction
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning's notes on unwrapped parameters (layer scales)
            with tracing(model) as keep:
                pruner = tp.pruner.MetaPruner(
                    model, example, importance=importance(importance_name),
                    pruning_ratio=MAX_RATIO if target else ratio, iterative_steps=TARGET_STEPS if target else 1,
                    ignored_layers=ignored + keep)
            if target is None:  # a ratio that would leave a group no channel: refused (kdprune/prune/limits.py)
                check_ratio(group_sizes(pruner, model), ratio, "channel", ChannelPruningError)
            after, applied = before, 0.0
            for step in range(1, (TARGET_STEPS if target else 1) + 1):
                if importance_name == "taylor":
                    _gradients(model, batches() if batches else ())
                pruner.step()
                model.zero_grad(set_to_none=True)
                after = dense_macs(model, shape)
                applied = MAX_RATIO * step / TARGET_STEPS if target else ratio
                if target is None or before / after >= target:
                    break
    except (ZeroDivisionError, RuntimeError, IndexError, KeyError, AttributeError) as e:
        raise ChannelPruningError(f"prune.method channel: Torch-Pruning cannot trace or prune this model "
                                  f"({type(e).__name__}: {str(e)[:200]}); use prune.method magnitude") from None
    finally:
        model.train(was_training)
    if target is not None and before / after < target:
        raise ChannelPruningError(f"prune.target_macs_reduction = {target}: pruning {MAX_RATIO:.0%} of every group's "
                                  f"channels reduced the MACs only {before / after:.2f}x; ask for less")
    return ChannelPruneResult(recorded(pruner.DG), before, after, applied)


def recorded(dg) -> list[list]:
    """A dependency graph's pruning history as plain lists of str, bool and int (what a spec stores)."""
    return [[str(name), bool(out), [int(j) for j in idxs]] for name, out, idxs in dg.pruning_history()]
