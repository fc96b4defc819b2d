"""Pruning masks: global unstructured magnitude pruning, masks that persist, sparsity accounting.

A *mask set* is a dict ``{parameter name: bool tensor}`` over the prunable weights. It is saved in
the checkpoint next to the weights. During recovery the training loop zeroes the masked
gradients before each optimizer step and re-applies the mask after it, so momentum and weight
decay can never revive a pruned weight.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

Masks = dict[str, torch.Tensor]


def prunable_modules(model: nn.Module, include_first_conv: bool = True,
                     include_last_fc: bool = True) -> list[tuple[str, nn.Module]]:
    """(name, module) of the conv and linear layers whose ``weight`` is prunable."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    fcs = [n for n, m in layers if isinstance(m, nn.Linear)]
    skip = set()
    if not include_first_conv and convs:
        skip.add(convs[0])
    if not include_last_fc and fcs:
        skip.add(fcs[-1])
    return [(n, m) for n, m in layers if n not in skip]


def global_magnitude_masks(model: nn.Module, ratio: float, include_first_conv: bool = True,
                           include_last_fc: bool = True) -> Masks:
    """Masks removing exactly ``round(ratio * N)`` of the N prunable weights, smallest |w| first,
    ranked globally across layers (``torch.nn.utils.prune.global_unstructured`` with L1).

    The model itself is left unchanged; apply the masks with :func:`apply_masks`.
    """
    layers = prunable_modules(model, include_first_conv, include_last_fc)
    total = sum(m.weight.numel() for _, m in layers)
    amount = int(round(ratio * total))
    originals = {n: m.weight.detach().clone() for n, m in layers}
    torch_prune.global_unstructured([(m, "weight") for _, m in layers],
                                    pruning_method=torch_prune.L1Unstructured, amount=amount)
    masks = {f"{n}.weight": m.weight_mask.detach().bool().clone() for n, m in layers}
    for n, m in layers:  # drop the reparametrisation, restore the dense weights
        torch_prune.remove(m, "weight")
        with torch.no_grad():
            m.weight.copy_(originals[n])
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks | None) -> None:
    if not masks:
        return
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))


@torch.no_grad()
def mask_grads(model: nn.Module, masks: Masks | None) -> None:
    if not masks:
        return
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        g = params[name].grad
        if g is not None:
            g.mul_(mask.to(g.dtype))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) over every parameter, BN included."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return total, nonzero


def count_prunable(model: nn.Module, include_first_conv: bool = True, include_last_fc: bool = True) -> tuple[int, int]:
    """(total, non-zero) over the prunable conv/linear weights."""
    layers = prunable_modules(model, include_first_conv, include_last_fc)
    total = sum(m.weight.numel() for _, m in layers)
    nonzero = sum(int(torch.count_nonzero(m.weight)) for _, m in layers)
    return total, nonzero


def compression_ratio(reference_total: int, student_nonzero: int) -> float:
    """reference params / student non-zero params (22x = 95.5 % removed)."""
    if student_nonzero <= 0:
        raise ValueError("student has no non-zero parameters; the compression ratio is undefined")
    return reference_total / student_nonzero
