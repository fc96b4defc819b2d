"""Recovery losses. Fine-tuning is the KD loss with alpha = 0 (DESIGN.md section 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdprune.errors import UserError


def kd_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
            alpha: float = 0.0, temperature: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The KL term is Hinton et al.'s soft-target loss: the teacher's distribution is the target,
    averaged over the batch; the T^2 factor keeps its gradient scale independent of T.
    With ``alpha == 0`` this is exactly cross-entropy and the teacher is not needed.
    """
    ce = F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return ce
    if teacher_logits is None:
        raise ValueError("kd_loss: alpha > 0 needs teacher_logits")
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * (t * t) * kl + (1.0 - alpha) * ce


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis (2017) spatial attention: the channel mean of squared activations,
    flattened and L2-normalised per sample, shape (N, H*W). It does not depend on the channel count,
    so a student with fewer channels than its teacher is compared map for map."""
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


class AttentionTransferError(UserError, ValueError):
    """Student and teacher maps cannot be compared (different counts or spatial sizes)."""


def at_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
            names: list[str] | None = None) -> torch.Tensor:
    """Attention-transfer term: sum over residual stages of the mean squared difference of the
    normalised attention maps (the paper's ``beta / 2 * sum_j ||Q_s/|Q_s| - Q_t/|Q_t|||``, with the
    beta factor applied by the caller). Zero for identical maps, positive otherwise."""
    if len(student_features) != len(teacher_features):
        raise AttentionTransferError(f"attention transfer: the student has {len(student_features)} residual stages and "
                                     f"the teacher {len(teacher_features)}; they must match stage for stage")
    total = student_features[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(student_features, teacher_features)):
        if s.shape[-2:] != t.shape[-2:]:
            where = f"layer {names[i]!r}" if names else f"stage {i + 1}"
            raise AttentionTransferError(f"attention transfer: {where} maps are {tuple(s.shape[-2:])} (student) and "
                                         f"{tuple(t.shape[-2:])} (teacher); spatial sizes must match (distill.at_layers)")
        total = total + (attention_map(s) - attention_map(t)).pow(2).mean()
    return total
