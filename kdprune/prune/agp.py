"""Gradual magnitude pruning during recovery (AGP: Zhu & Gupta, 2017): the cubic sparsity schedule and the
mask updates it triggers inside the training loop."""
from __future__ import annotations

import torch.nn as nn

from kdprune.prune.masks import Masks, global_magnitude_masks


def agp_sparsity(step: int, steps: int, target: float) -> float:
    """Zhu & Gupta (2017) cubic schedule: sparsity after pruning step ``step`` of ``steps`` (1-based),
    from 0 towards ``target``: ``s_t = s_f + (s_i - s_f) (1 - t/n)^3`` with s_i = 0. The last step gives
    exactly ``target``."""
    if not 1 <= step <= steps:
        raise ValueError(f"AGP step {step} outside 1..{steps}")
    return target * (1.0 - (1.0 - step / steps) ** 3)


class AGPSchedule:
    """Gradual magnitude pruning during recovery: the global magnitude mask is recomputed on the
    current weights at ``steps`` evenly spaced optimizer steps spread over the first ``end`` fraction
    of training, with the cubic AGP sparsity, so the last update hits the target exactly and the
    rest of training recovers with that mask fixed.
    """

    def __init__(self, target: float, steps: int, end: float, total_steps: int, include_first_conv: bool = True,
                 include_last_fc: bool = True, min_layer_density: float = 0.0):
        self.target, self.steps, self.end = target, steps, end
        self.include_first_conv, self.include_last_fc = include_first_conv, include_last_fc
        self.min_layer_density = min_layer_density
        last = max(1, int(round(end * total_steps)))
        # optimizer step (1-based) after which pruning update k (1..steps) happens
        self.at = {max(1, int(round(k * last / steps))): k for k in range(1, steps + 1)}
        if len(self.at) < steps:  # fewer optimizer steps than pruning steps: no update may be lost
            self.at = {min(total_steps, k): k for k in range(1, steps + 1)}

    def config(self) -> dict:
        return {"target": self.target, "steps": self.steps, "end": self.end, "at": sorted(self.at)}

    def masks_at(self, model: nn.Module, step: int) -> Masks | None:
        """New masks if pruning update happens after optimizer step ``step``, else None."""
        k = self.at.get(step)
        if k is None:
            return None
        return global_magnitude_masks(model, agp_sparsity(k, self.steps, self.target), self.include_first_conv,
                                      self.include_last_fc, self.min_layer_density)
