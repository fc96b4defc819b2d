import math

import pytest
import torch
import torch.nn.functional as F

from kdprune.train.losses import kd_loss


def test_kd_loss_hand_computed():
    s = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([0])
    T, alpha = 2.0, 0.75
    # by hand: p_t = softmax(t/T) = softmax([0, 1]), p_s = softmax([1, 0])
    e = math.e
    pt = [1 / (1 + e), e / (1 + e)]
    ps = [e / (1 + e), 1 / (1 + e)]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    ce = -math.log(math.exp(2) / (math.exp(2) + 1))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert kd_loss(s, y, t, alpha=alpha, temperature=T).item() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    assert torch.equal(kd_loss(s, y, t, alpha=0.0, temperature=4.0), F.cross_entropy(s, y))
    assert torch.equal(kd_loss(s, y, None, alpha=0.0), F.cross_entropy(s, y))


def test_kd_term_zero_when_student_matches_teacher_and_gradient_scale():
    torch.manual_seed(0)
    t = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    assert kd_loss(t.clone(), y, t, alpha=1.0, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 10, requires_grad=True)
    kd_loss(s, y, t, alpha=1.0, temperature=3.0).backward()
    g = s.grad.clone()  # T^2 scaling: grad = T * (p_s - p_t) / batch
    manual = 3.0 * (F.softmax(s.detach() / 3, 1) - F.softmax(t / 3, 1)) / 8
    assert torch.allclose(g, manual, atol=1e-6)


def test_alpha_needs_teacher():
    with pytest.raises(ValueError, match="teacher"):
        kd_loss(torch.randn(2, 3), torch.tensor([0, 1]), None, alpha=0.5)
