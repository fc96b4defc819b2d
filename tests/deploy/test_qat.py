"""Quantization-aware training (kdprune/deploy/qat.py): fake quantization attached and removed without a trace,
pruned zeros kept, straight-through gradients, ranges learnt in training only, and a tiny QAT-KD run."""
import torch
import torch.nn as nn

from kdprune.data import TensorLoader
from kdprune.deploy import qat
from kdprune.models import build_model, resnet_spec
from kdprune.params import DistillParams, RuntimeParams
from kdprune.prune.counts import count_prunable
from kdprune.prune.masks import apply_masks, global_magnitude_masks
from kdprune.train.loop import fit
from kdprune.train.objective import Objective


def model(seed=0):
    torch.manual_seed(seed)
    return build_model(resnet_spec(8, 4, 1, 10))


def test_weights_go_to_their_per_channel_int8_grid_and_zeros_stay_zero():
    w = torch.randn(6, 3, 3, 3)
    w[0, 0] = 0
    fq = qat.fake_quant_weight(w)
    scale = w.abs().flatten(1).amax(1) / qat.WEIGHT_QMAX
    steps = fq / scale[:, None, None, None]
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= qat.WEIGHT_QMAX + 1e-4
    assert torch.all(fq[0, 0] == 0)
    assert (fq - w).abs().max() <= scale.max() / 2 + 1e-6  # rounding, never more


def test_attach_changes_the_outputs_and_remove_restores_them_exactly_with_the_same_state_dict():
    m = model()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = 0.0  # the training-mode forward below leaves the running statistics as they are
    x = torch.randn(16, 1, 28, 28)
    m.eval()
    with torch.no_grad():
        before = m(x)
    keys = list(m.state_dict())
    fq = qat.attach(m)
    assert list(m.state_dict()) == keys  # no module, parameter or buffer added: masks and checkpoints unchanged
    m.train()
    m(x)  # observe the activation ranges
    m.eval()
    with torch.no_grad():
        quantized = m(x)
    assert not torch.equal(quantized, before)
    assert (quantized - before).abs().max() < 0.5 * before.abs().max()  # rounding noise, not another function
    fq.remove()
    with torch.no_grad():
        assert torch.equal(m(x), before)


def test_gradients_pass_straight_through_and_eval_leaves_the_ranges_alone():
    m = model()
    fq = qat.attach(m)
    m.train()
    loss = m(torch.randn(8, 1, 28, 28)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (m.conv1.weight, m.fc.weight))
    ranges = [(r.lo.clone(), r.hi.clone()) for r in fq.ranges]
    m.eval()
    with torch.no_grad():
        m(10 * torch.randn(8, 1, 28, 28))  # test data must never move the ranges
    assert all(torch.equal(a, r.lo) and torch.equal(b, r.hi) for (a, b), r in zip(ranges, fq.ranges))


def test_a_tiny_qat_kd_run_trains_through_the_fake_quantization_and_keeps_the_mask():
    student, teacher = model(0), model(3)
    masks = global_magnitude_masks(student, 0.8)
    apply_masks(student, masks)
    _, nz = count_prunable(student)
    torch.manual_seed(1)
    x = torch.randint(0, 255, (96, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (96,))
    loader = TensorLoader(x, y, [0.5], [0.25], batch_size=32, train=True, crop_padding=1, hflip=True)
    test = TensorLoader(x, y, [0.5], [0.25], batch_size=96, train=False)
    cfg = DistillParams(epochs=1, batch_size=32, lr=0.1, eval_every=0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    fq = qat.attach(student)
    history = fit(student, loader, test, cfg, runtime=RuntimeParams(threads=1), masks=masks, name="kd",
                  log=lambda m: None, objective=Objective(teacher=teacher, alpha=0.9, temperature=4.0))
    fq.remove()
    assert torch.isfinite(torch.tensor(history[-1]["train_loss"]))
    assert count_prunable(student)[1] <= nz  # the mask held through fake quantization
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    assert all(r.lo is not None for r in fq.ranges)  # every layer's input range was learnt


def test_a_model_without_conv_or_linear_layers_is_refused():
    import pytest

    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        qat.attach(nn.Sequential(nn.ReLU()))
