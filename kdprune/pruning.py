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

    No layer is ever emptied: if the global threshold would remove every weight of a layer (a
    layer of small weights at a high ratio), that layer keeps its single largest-|w| weight, so the
    network stays connected and trainable, and the next-smallest surviving weights of the other
    layers are removed instead, so the removed count stays exactly ``round(ratio * N)``. Only when
    that is impossible (``round(ratio * N) > N - number of layers``) are fewer removed: exactly one
    weight is left in every layer. Chosen over refusing the ratio so a sweep does not die at its
    last point.

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
    _keep_one_per_layer(masks, [f"{n}.weight" for n, _ in layers], {f"{n}.weight": originals[n] for n, _ in layers})
    return masks


def _keep_one_per_layer(masks: Masks, names: list[str], weights: dict[str, torch.Tensor]) -> None:
    """Revive the largest |w| of every emptied layer; remove as many of the smallest survivors
    elsewhere (never a layer's last one), so the removed count stays the same."""
    emptied = [n for n in names if masks[n].numel() and not masks[n].any()]
    if not emptied:
        return
    for n in emptied:
        masks[n].view(-1)[weights[n].abs().view(-1).argmax()] = True
    survivors = {n: int(masks[n].sum()) for n in names}
    cand_w, cand_layer, cand_idx = [], [], []
    for li, n in enumerate(names):
        idx = masks[n].view(-1).nonzero().view(-1)
        cand_w.append(weights[n].abs().view(-1)[idx])
        cand_layer.append(torch.full_like(idx, li))
        cand_idx.append(idx)
    order = torch.argsort(torch.cat(cand_w), stable=True)
    layer_of, idx_of = torch.cat(cand_layer)[order].tolist(), torch.cat(cand_idx)[order].tolist()
    debt = len(emptied)
    for li, i in zip(layer_of, idx_of):
        if debt == 0:
            break
        n = names[li]
        if survivors[n] > 1:
            masks[n].view(-1)[i] = False
            survivors[n] -= 1
            debt -= 1


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
