"""Counting what pruning removed: prunable layers, parameters (total and non-zero), the sparsest layer, the
compression ratio, and MACs (dense, and those of non-zero weights) with torch's FlopCounterMode."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def prunable_modules(model: nn.Module, include_first_conv: bool = True,
                     include_last_fc: bool = True) -> list[tuple[str, nn.Module]]:
    """(name, module) of the conv and linear layers whose ``weight`` is prunable."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    fcs = [n for n, m in layers if isinstance(m, nn.Linear)]
    skip = set()
    if not include_first_conv and convs:
        skip.add(convs[0])
    if not include_last_fc and fcs:
        skip.add(fcs[-1])
    return [(n, m) for n, m in layers if n not in skip]


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) over every parameter, BN included."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return total, nonzero


def sparsest_layer(model: nn.Module, include_first_conv: bool = True, include_last_fc: bool = True) -> float:
    """The smallest fraction of non-zero weights in any prunable layer (1.0: none pruned, 1/n: one weight kept)."""
    fractions = [int(torch.count_nonzero(m.weight)) / m.weight.numel()
                 for _, m in prunable_modules(model, include_first_conv, include_last_fc) if m.weight.numel()]
    return min(fractions, default=1.0)


def count_prunable(model: nn.Module, include_first_conv: bool = True, include_last_fc: bool = True) -> tuple[int, int]:
    """(total, non-zero) over the prunable conv/linear weights."""
    layers = prunable_modules(model, include_first_conv, include_last_fc)
    total = sum(m.weight.numel() for _, m in layers)
    nonzero = sum(int(torch.count_nonzero(m.weight)) for _, m in layers)
    return total, nonzero


def compression_ratio(reference_total: int, student_nonzero: int) -> float:
    """reference params / student non-zero params (22x = 95.5 % removed)."""
    if student_nonzero <= 0:
        raise ValueError("student has no non-zero parameters; the compression ratio is undefined")
    return reference_total / student_nonzero


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def dense_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of a single input, counted by FlopCounterMode."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=device_of(model))
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def nonzero_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs that a sparse kernel would need: each conv/linear counts only its non-zero weights.

    Dense kernels (what PyTorch runs) do the full dense MACs whatever the sparsity; this is the
    theoretical figure papers quote for unstructured pruning.
    """
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        nz = int(torch.count_nonzero(module.weight))
        positions = output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
        total += nz * positions

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        model(torch.zeros(1, *input_shape, device=device_of(model)))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total
