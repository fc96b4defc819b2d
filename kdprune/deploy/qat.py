"""Quantization-aware training: torch's fake-quantization ops on every conv and linear layer, in the scheme
that onnxruntime's static INT8 quantizer (kdprune/deploy/int8.py) applies to the exported model afterwards.

- **Weights**: per output channel, symmetric, int8 in [-127, 127], scale = max |w| / 127 (onnxruntime's
  per-channel symmetric weights). Per-channel symmetric scaling commutes with folding a BatchNorm into the
  conv before it (folding multiplies each output channel by one number), so the grid trained on here is the
  grid of the folded weights the INT8 file holds. A pruned weight (0) stays 0 on that grid.
- **Activations**: the input of every conv and linear layer, per tensor, uint8 with a zero point, its range a
  moving average (0.01) of the batches' min and max (0 always inside it), as torch's
  ``MovingAverageMinMaxObserver``; the ranges update in training mode only, so evaluating on the test split
  leaves them alone. onnxruntime then calibrates its own ranges on ``quantize.calibration_images`` (MinMax):
  what this training makes robust is the rounding, not one particular range.

Straight-through gradients (``torch.fake_quantize_per_channel_affine`` / ``..._per_tensor_affine``).
:func:`attach` changes no parameter, buffer or module name (the state_dict, the masks and the checkpoints
stay as they are): it replaces the layers' ``forward`` and :meth:`FakeQuant.remove` restores it. The
activation ranges are not in the state_dict: a resumed run starts them afresh.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHT_QMAX = 127  # symmetric int8: [-127, 127]
ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations
AVERAGING = 0.01  # the moving average's weight of each new batch (torch's MovingAverageMinMaxObserver)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to its per-output-channel symmetric int8 grid, with straight-through gradients."""
    amax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
    scale = (amax / WEIGHT_QMAX).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -WEIGHT_QMAX, WEIGHT_QMAX)


class ActivationRange:
    """The moving-average min/max of one layer's input and its uint8 fake quantization."""

    def __init__(self) -> None:
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().amin().float(), x.detach().amax().float()
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + AVERAGING * (lo - self.lo)
            self.hi = self.hi + AVERAGING * (hi - self.hi)

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if training:
            self.observe(x)
        if self.lo is None:  # never observed (evaluated before any training step): left as it is
            return x
        lo, hi = torch.clamp(self.lo, max=0.0), torch.clamp(self.hi, min=0.0)
        scale = float(torch.clamp((hi - lo) / (ACT_QMAX - ACT_QMIN), min=1e-8))
        zero = int(min(max(round(-float(lo) / scale), ACT_QMIN), ACT_QMAX))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, ACT_QMIN, ACT_QMAX)


def _quantized_forward(layer: nn.Module, act: ActivationRange):
    if isinstance(layer, nn.Conv2d):
        def forward(x):
            return layer._conv_forward(act(x, layer.training), fake_quant_weight(layer.weight), layer.bias)
    else:
        def forward(x):
            return F.linear(act(x, layer.training), fake_quant_weight(layer.weight), layer.bias)
    return forward


class FakeQuant:
    """The fake quantization attached to a model's conv and linear layers; ``remove()`` detaches it."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
        if not self.layers:
            raise ValueError("quantize.method qat: the model has no nn.Conv2d or nn.Linear layer to quantize")
        self.ranges = [ActivationRange() for _ in self.layers]
        for layer, act in zip(self.layers, self.ranges):
            layer.forward = _quantized_forward(layer, act)

    def remove(self) -> None:
        for layer in self.layers:
            del layer.forward  # back to the class's forward
        self.layers = []


def attach(model: nn.Module) -> FakeQuant:
    """Fake-quantize ``model``'s conv and linear layers (weights and inputs) in place, until ``.remove()``."""
    return FakeQuant(model)
