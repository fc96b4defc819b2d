"""Pruning: ``prune()`` turns a trained teacher into the pruned model of ``prune.method``.

  magnitude  global unstructured magnitude masks (masks.py): the model keeps its shape, zeros + a mask; any model
  l1_filter  Li et al. filter pruning of the zoo's residual blocks (filters.py): channels physically removed
  channel    any architecture through Torch-Pruning's dependency graph (channel.py): ``prune.ratio`` of every
             group's channels, or until the MACs fall by ``prune.target_macs_reduction``; the spec stores the
             pruning history that rebuilds it
Gradual pruning during recovery (``prune.schedule: agp``) is agp.py; what was removed is counted by counts.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from kdprune.models import build_model, record_pruning, spec_of
from kdprune.prune.channel import channel_prune
from kdprune.prune.filters import l1_filter_prune
from kdprune.prune.masks import Masks, apply_masks, global_magnitude_masks


@dataclass
class Pruned:
    """The pruned model, its masks (magnitude only) and the method's own metrics (numbers only)."""
    model: nn.Module
    masks: Masks | None = None
    metrics: dict[str, float] = field(default_factory=dict)


Batches = Callable[[], Iterable] | None  # () -> (x, y) training batches: the gradients of taylor importance


def _magnitude(model: nn.Module, p, example: torch.Tensor, batches: Batches) -> Pruned:
    masks = global_magnitude_masks(model, p.ratio, p.include_first_conv, p.include_last_fc, p.min_layer_density)
    apply_masks(model, masks)
    return Pruned(model, masks)


def _l1_filter(model: nn.Module, p, example: torch.Tensor, batches: Batches) -> Pruned:
    l1_filter_prune(model, p.ratio, example)
    return Pruned(model)


def _channel(model: nn.Module, p, example: torch.Tensor, batches: Batches) -> Pruned:
    result = channel_prune(model, example, p.importance, p.ratio, p.target_macs_reduction, batches=batches)
    record_pruning(model, result.history, tuple(example.shape[1:]))
    # the target and the importance are params (prune.*); what was reached is measured
    return Pruned(model, metrics={"channel_ratio": result.ratio, "reached_macs_reduction": result.mac_reduction})


METHODS = {"magnitude": _magnitude, "l1_filter": _l1_filter, "channel": _channel}  # = kdprune.params.PRUNE_METHODS
PHYSICAL = frozenset({"l1_filter", "channel"})  # remove channels: the model is rebuilt from its new spec


def prune(teacher: nn.Module, p, input_shape: tuple[int, ...], allowed_factory: str | None = None,
          batches: Batches = None) -> Pruned:
    """Prune a copy of ``teacher`` as the ``prune`` params section ``p`` says; the teacher is left untouched.

    ``input_shape``: one input's (C, H, W); ``allowed_factory``: params' ``model.factory`` (the only custom
    factory a rebuild may import); ``batches``: training batches for ``prune.importance: taylor``. A physically
    pruned model is rebuilt from its new spec, so its checkpoint describes itself."""
    model = build_model(spec_of(teacher), allowed_factory)
    model.load_state_dict(teacher.state_dict())
    out = METHODS[p.method](model, p, torch.zeros(1, *input_shape), batches)
    if p.method in PHYSICAL:
        shrunk = build_model(spec_of(out.model), allowed_factory)
        shrunk.load_state_dict(out.model.state_dict())
        out.model = shrunk
    return out
