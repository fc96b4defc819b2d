"""What a training run minimises: the one KD loss, with the teacher and its weights.

``loss = alpha * T^2 * KL(softmax(s/T) || softmax(t/T)) + (1 - alpha) * CE(s, y)`` (losses.kd_loss), plus
``at_beta / 2 * losses.at_loss`` on the outputs of the modules ``at_layers`` (attention transfer; default: the
zoo's residual stages, features.default_layers). Fine-tuning and teacher training are alpha = 0: ``PLAIN``."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Objective:
    teacher: nn.Module | None = None
    alpha: float = 0.0  # weight of the KD term
    temperature: float = 1.0
    at_beta: float = 0.0  # weight of attention transfer (needs a teacher)
    at_layers: tuple[str, ...] | list[str] | None = None  # None: features.default_layers of the student

    @property
    def uses_teacher(self) -> bool:
        """Whether the teacher's outputs enter the loss (alpha > 0 or at_beta > 0)."""
        return self.teacher is not None and (self.alpha > 0 or self.at_beta > 0)


PLAIN = Objective()  # cross-entropy only
