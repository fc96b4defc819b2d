"""The ``prune.ratio`` that the structured methods (l1_filter, channel) can honour on a model.

Torch-Pruning keeps ``int(n * (1 - ratio))`` of the n channels of each group (its ``MetaPruner``, local pruning).
Where that is 0 it would empty the group, and its ``check_pruning_group`` then leaves the whole group as it was,
without a word: on ResNet-8 w16 the 16-channel groups stay whole above ratio 0.9375, the 32-channel ones above
0.9688, and at 0.99 no group loses a channel (1.00x), so the compression fell as the ratio grew (l1_filter 7.5x at
0.9, 6.9x at 0.95, 3.4x at 0.97, 1.00x at 0.99). :func:`check_ratio` refuses such a ratio before anything is
pruned, naming the largest one that keeps a channel in every group, and refuses a ratio > 0 that removes no
channel. Below that limit each group keeps ``int(n * (1 - ratio)) >= 1`` channels, a count that never grows with
the ratio, so the compression never falls as the ratio grows.
"""
from __future__ import annotations

import math

import torch.nn as nn

RATIO_DECIMALS = 4  # the limit is named as a clean 4-decimal ratio (the frontier's probes have 4 decimals too)


def kept(n: int, ratio: float) -> int:
    """The channels Torch-Pruning keeps of a group of ``n`` at ``ratio`` (exactly its arithmetic)."""
    return int(n * (1 - ratio))


def largest_ratio(n: int) -> float:
    """The largest ratio with 4 decimals at which a group of ``n`` >= 2 channels keeps at least one."""
    scale = 10 ** RATIO_DECIMALS
    k = math.floor((1 - 1 / n) * scale + 1e-6)
    while k > 0 and kept(n, k / scale) < 1:  # 1 - 0.9 is 0.0999...: 10 channels at ratio 0.9 keep 0
        k -= 1
    return k / scale


def group_sizes(pruner, model: nn.Module) -> list[tuple[str, int]]:
    """(root layer's name, channels) of every group that ``pruner`` (a Torch-Pruning pruner, before its step) may
    prune, the channels counted as Torch-Pruning counts them (per channel group of a grouped conv)."""
    names = {m: name for name, m in model.named_modules()}
    out = []
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        if not pruner._check_pruning_ratio(group):  # a group of one channel: Torch-Pruning never prunes it
            continue
        root = group[0][0].target.module
        channels = pruner.DG.get_out_channels(root)
        if channels is None:
            continue
        out.append((names.get(root, type(root).__name__), int(channels) // pruner._get_channel_groups(group)))
    return out


def check_ratio(groups: list[tuple[str, int]], ratio: float, method: str, error: type[Exception]) -> None:
    """Raise ``error`` (one line) when ``ratio`` > 0 would leave some group of ``groups`` (see :func:`group_sizes`)
    with no channel, which Torch-Pruning answers by keeping that group whole, or would remove no channel at all."""
    if ratio <= 0:
        return
    what = f"prune.ratio = {ratio} is invalid for prune.method {method} on this model"
    if not groups:
        raise error(f"{what}: no layer has channels that can be removed; use prune.method magnitude")
    empty = sorted((n, name) for name, n in groups if kept(n, ratio) < 1)
    if empty:
        n, name = empty[0]
        more = f" (and {len(empty) - 1} more layer{'s' if len(empty) > 2 else ''})" if len(empty) > 1 else ""
        limit = min(largest_ratio(c) for _, c in groups)
        raise error(f"{what}: it would keep int({n} x (1 - {ratio})) = 0 of the {n} channels of {name}{more}, and "
                    f"Torch-Pruning then leaves such a layer whole, so it would compress less than a lower ratio; "
                    f"the largest ratio that keeps a channel in every layer is {limit}")
    if all(kept(n, ratio) >= n for _, n in groups):
        raise error(f"{what}: it removes no channel (each layer keeps int(n x (1 - ratio)) of its n); use 0 for no "
                    f"pruning, or at least {10 ** -RATIO_DECIMALS}")
