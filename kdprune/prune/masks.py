"""Pruning masks: global unstructured magnitude pruning (with per-layer floors) and masks that persist.

A *mask set* is a dict ``{parameter name: bool tensor}`` over the prunable weights. It is saved in
the checkpoint next to the weights. During recovery the training loop zeroes the masked
gradients before each optimizer step and re-applies the mask after it, so momentum and weight
decay can never revive a pruned weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import prune as torch_prune

from kdprune.errors import UserError
from kdprune.prune.counts import prunable_modules

Masks = dict[str, torch.Tensor]


class PruningError(UserError, ValueError):
    """The model cannot be pruned as asked (non-finite weights: a diverged teacher; an l1_filter ratio that would
    leave a layer no filter)."""


def check_finite(model: nn.Module, what: str = "the model") -> None:
    """Refuse a model with NaN or infinite parameters or buffers: magnitudes of NaN weights rank arbitrarily,
    so pruning them gives garbage (a diverged teacher once "pruned" to 1.00x at ratio 0.8)."""
    bad = [(n, int((~torch.isfinite(t)).sum())) for n, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        listed = ", ".join(f"{n} ({k} values)" for n, k in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise PruningError(f"{what} has NaN or infinite weights in {listed}: its training diverged; retrain it "
                           "with a smaller learning rate or weight decay")


def global_magnitude_masks(model: nn.Module, ratio: float, include_first_conv: bool = True,
                           include_last_fc: bool = True, min_layer_density: float = 0.0) -> Masks:
    """Masks removing exactly ``round(ratio * N)`` of the N prunable weights, smallest |w| first,
    ranked globally across layers: ``torch.nn.utils.prune.L1Unstructured`` applied to the
    concatenated |w| of all layers, which is what ``prune.global_unstructured`` does, but without
    re-parametrising the modules (so any memory format works and the model is never touched).

    No layer is ever emptied: if the global threshold would remove every weight of a layer (a
    layer of small weights at a high ratio), that layer keeps its single largest-|w| weight, so the
    network stays connected and trainable, and the next-smallest surviving weights of the other
    layers are removed instead, so the removed count stays exactly ``round(ratio * N)``. Only when
    that is impossible (``round(ratio * N) > N - number of layers``) are fewer removed: exactly one
    weight is left in every layer. Chosen over refusing the ratio so a sweep does not die at its
    last point.

    ``min_layer_density`` d > 0 raises that floor: every layer keeps at least ``ceil(d * n)`` of its n
    weights, its largest |w| (global ranking alone left 1 of 36,864 weights in a ResNet-8 layer at ratio
    0.99, and the network at chance). The floors are taken out of the global ranking, so the smallest
    weights of the other layers go instead and exactly ``round(ratio * N)`` are still removed, unless the
    floors leave fewer than that to remove (d > 1 - ratio, nearly): then every weight outside them goes.
    """
    check_finite(model)
    layers = prunable_modules(model, include_first_conv, include_last_fc)
    weights = {f"{n}.weight": m.weight.detach().float() for n, m in layers}
    scores = torch.cat([w.reshape(-1).abs() for w in weights.values()])
    amount = int(round(ratio * scores.numel()))
    if min_layer_density > 0:
        scores = _protect_floors(weights, scores, min_layer_density)
        amount = min(amount, int(torch.isfinite(scores).sum()))
    flat = torch_prune.L1Unstructured(amount=amount).compute_mask(scores, torch.ones_like(scores)).bool()
    masks: Masks = {}
    offset = 0
    for name, w in weights.items():
        masks[name] = flat[offset:offset + w.numel()].view(w.shape).clone()
        offset += w.numel()
    _keep_one_per_layer(masks, list(weights), weights)
    return masks


def layer_floor(n: int, min_layer_density: float) -> int:
    """The weights a layer of ``n`` keeps at least: ceil(d * n), at most n (d * n rounded to 9 places first, so
    0.1 * 30 is 3, not 4)."""
    return min(n, math.ceil(round(min_layer_density * n, 9)))


def _protect_floors(weights: dict[str, torch.Tensor], scores: torch.Tensor, min_layer_density: float) -> torch.Tensor:
    """``scores`` with each layer's ``layer_floor`` largest |w| set to +inf: out of the global ranking."""
    scores = scores.clone()
    offset = 0
    for w in weights.values():
        n = w.numel()
        k = layer_floor(n, min_layer_density)
        if k:
            top = torch.topk(w.reshape(-1).abs(), k, sorted=False).indices
            scores[offset + top] = math.inf
        offset += n
    return scores


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


