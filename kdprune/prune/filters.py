"""Structured filter pruning after Li et al. (2017) for the zoo's residual blocks (``prune.method: l1_filter``):
the inner convs' smallest-L1 filters are physically removed with Torch-Pruning."""
from __future__ import annotations

import torch
import torch.nn as nn

from kdprune.prune.limits import check_ratio, group_sizes
from kdprune.prune.masks import PruningError, check_finite


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of a ResNet (every module with a ``shortcut``)."""
    return [m for m in model.modules() if hasattr(m, "shortcut")]


def inner_convs(model: nn.Module) -> list[nn.Conv2d]:
    """Convs whose output channels stay inside a residual block: all convs of a block's residual branch
    but its last one (whose output is added to the shortcut). Li et al. (2017) prune exactly these."""
    out = []
    for block in residual_blocks(model):
        branch = [m for name, m in block.named_children() if isinstance(m, nn.Conv2d)]
        out.extend(branch[:-1])
    return out


def l1_filter_prune(model: nn.Module, ratio: float, example_input: torch.Tensor) -> nn.Module:
    """Structured filter pruning after Li et al. (2017), in place, with Torch-Pruning.

    In every residual block, ``ratio`` of the filters of each inner conv (see :func:`inner_convs`) are
    removed, those with the smallest L1 norm (Torch-Pruning's ``MagnitudeImportance(p=1,
    group_reduction="first")``, i.e. the L1 norm of the filter itself). Torch-Pruning's dependency
    graph removes the matching BN channels and the next conv's input channels with them, so the model
    is physically smaller. The stem, the residual path (each block's last conv, the shortcuts) and the
    classifier keep their widths, so residual additions stay valid. Call ``models.spec_of`` afterwards
    to get the new architecture spec. A ratio at which some inner conv would keep no filter is refused
    (:class:`PruningError`, see kdprune/prune/limits.py) before anything is pruned.
    """
    import torch_pruning as tp  # heavy optional dependency: imported only when channels are removed

    if not 0 <= ratio < 1:
        raise ValueError(f"l1_filter ratio {ratio} outside [0, 1)")
    check_finite(model)
    prunable = set(inner_convs(model))
    if not prunable:
        raise ValueError("l1_filter: the model has no residual blocks with inner convs to prune")
    ignored = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in prunable]
    was_training = model.training
    model.eval()
    try:
        pruner = tp.pruner.MagnitudePruner(
            model, example_input, importance=tp.importance.MagnitudeImportance(p=1, normalizer=None,
                                                                                 group_reduction="first"),
            pruning_ratio=ratio, ignored_layers=ignored)
        check_ratio(group_sizes(pruner, model), ratio, "l1_filter", PruningError)
        pruner.step()
    finally:
        model.train(was_training)
    return model
