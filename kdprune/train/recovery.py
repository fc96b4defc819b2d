"""Recovery variants of the distill stage, and how each one's student starts.

Every variant runs through the same ``fit`` loop (kdprune/train/loop.py) with the same epochs, learning-rate schedule,
data order and (for unstructured pruning) the same mask; they differ only in where the student
starts and in the loss:

  ============  ==============================  ===================================================
  variant       student starts from             loss
  ============  ==============================  ===================================================
  kd            the pruned teacher weights      KD from the unpruned teacher (alpha = distill.alpha)
  finetune      the pruned teacher weights      cross-entropy (KD with alpha = 0)
  scratch       a random re-init of the pruned  cross-entropy
                architecture, mask kept
  scratch_kd    the same re-init                KD from the unpruned teacher
  ============  ==============================  ===================================================

``distill.at_beta > 0`` adds attention transfer (``losses.at_loss``) to the variants that have a
teacher (kd, scratch_kd). With ``prune.schedule: agp`` the kd and finetune students start from the
*dense* teacher weights and are pruned gradually during recovery (``prune.agp.AGPSchedule``) to the
same sparsity; scratch variants, which have no trained weights to rank, keep the one-shot mask.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from kdprune.models import build_model, spec_of
from kdprune.prune.agp import AGPSchedule
from kdprune.prune.masks import Masks, apply_masks
from kdprune.train.objective import Objective


@dataclass(frozen=True)
class Variant:
    name: str
    kd: bool  # distil from the unpruned teacher (alpha = distill.alpha); else alpha = 0
    reinit: bool  # start from a random re-initialisation of the pruned architecture


VARIANTS = {v.name: v for v in (Variant("kd", kd=True, reinit=False), Variant("finetune", kd=False, reinit=False),
                                Variant("scratch", kd=False, reinit=True), Variant("scratch_kd", kd=True, reinit=True))}


def reinitialise(pruned: nn.Module, masks: Masks | None, seed: int, allowed_factory: str | None = None) -> nn.Module:
    """A freshly initialised model of ``pruned``'s (possibly physically pruned) architecture, with the
    same mask applied: the weights are new, the zeros are where the pruned model's are."""
    torch.manual_seed(seed)
    model = build_model(spec_of(pruned), allowed_factory)
    apply_masks(model, masks)
    return model


@dataclass
class Start:
    student: nn.Module
    masks: Masks | None  # updated in place by fit when schedule is set
    alpha: float
    at_beta: float
    gradual: bool  # prune gradually (AGP) during recovery

    def objective(self, teacher: nn.Module, distill) -> Objective:
        """This start's loss: KD and attention transfer from ``teacher`` where the variant uses them (the
        ``distill`` section gives the temperature and the attention-transfer layers)."""
        uses_teacher = self.alpha > 0 or self.at_beta > 0
        return Objective(teacher if uses_teacher else None, self.alpha, distill.temperature, self.at_beta,
                         distill.at_layers or None)


def starting_point(variant: str, params, pruned: nn.Module, masks: Masks | None, teacher: nn.Module) -> Start:
    """The student, masks and loss weights a variant starts recovery with (see the module docstring)."""
    v = VARIANTS[variant]
    alpha = params.distill.alpha if v.kd else 0.0
    at_beta = params.distill.at_beta if v.kd else 0.0
    if v.reinit:
        return Start(reinitialise(pruned, masks, params.seed, params.model.factory), masks, alpha, at_beta, gradual=False)
    if params.prune.schedule == "agp":
        dense = build_model(spec_of(teacher), params.model.factory)
        dense.load_state_dict(teacher.state_dict())
        return Start(dense, {}, alpha, at_beta, gradual=True)
    return Start(pruned, masks, alpha, at_beta, gradual=False)


def train_settings(distill, variant: str):
    """The ``distill`` settings one variant trains with: finetune at ``distill.finetune_lr`` when set."""
    return replace(distill, lr=distill.finetune_lr) if variant == "finetune" and distill.finetune_lr is not None \
        else distill


def agp_schedule(p, total_steps: int) -> AGPSchedule:
    """The AGP schedule of the ``prune`` params section over ``total_steps`` optimizer steps."""
    return AGPSchedule(p.ratio, p.agp_steps, p.agp_end, total_steps, p.include_first_conv, p.include_last_fc,
                       p.min_layer_density)
