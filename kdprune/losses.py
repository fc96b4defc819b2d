"""Recovery losses. Fine-tuning is the KD loss with alpha = 0 (DESIGN.md section 2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
