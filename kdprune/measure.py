"""Measurements of a model: accuracy, the size report against the teacher, CPU latency, BatchNorm folding.
Counting (parameters, MACs) lives in kdprune/prune/counts.py."""
from __future__ import annotations

import copy
import platform
import statistics
import time

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kdprune.prune.counts import compression_ratio, count_params, count_prunable, device_of


@torch.inference_mode()
def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy in percent over every sample the loader yields, on the model's device."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # no-op when already there
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def size_report(model: nn.Module, reference: nn.Module, include_first_conv: bool, include_last_fc: bool) -> dict:
    """Parameter counts of ``model`` and both compression ratios against ``reference`` (the teacher)."""
    total, nonzero = count_params(model)
    ref_total, _ = count_params(reference)
    prunable, prunable_nz = count_prunable(model, include_first_conv, include_last_fc)
    ref_prunable, _ = count_prunable(reference, include_first_conv, include_last_fc)
    return {
        "params": total,
        "nonzero_params": nonzero,
        "prunable_params": prunable,
        "nonzero_prunable_params": prunable_nz,
        "sparsity": 1.0 - nonzero / total,
        "prunable_sparsity": 1.0 - prunable_nz / prunable if prunable else 0.0,
        "compression_ratio": compression_ratio(ref_total, nonzero),
        "prunable_compression_ratio": compression_ratio(ref_prunable, prunable_nz),
    }


@torch.inference_mode()
def latency_ms(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int, repeats: int,
               warmup: int = 3, channels_last: bool = False) -> dict[str, float]:
    """Median wall time in milliseconds of one forward pass of a ``batch`` of inputs, per model (fp32, eval
    mode, the current torch thread count), over ``repeats`` timed runs after ``warmup`` untimed ones. The
    models take turns run by run, so drift on a shared machine hits them all alike.

    Unstructured sparsity does not make a model faster: dense kernels multiply the zeros too. Only
    physically removed channels (structured pruning) reduce this.
    """
    x = torch.randn(batch, *input_shape)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    modes = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
        for _ in range(warmup):
            m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append(time.perf_counter() - t0)
    for k, m in models.items():
        m.train(modes[k])
    return {k: 1000.0 * statistics.median(v) for k, v in times.items()}


def cpu_busy_fraction(seconds: float = 0.5) -> float | None:
    """Fraction of all CPU time spent by *other* work over ``seconds`` (this process sleeps meanwhile), from
    /proc/stat; None where /proc/stat is missing (not Linux). Latency timed on a busy machine measures the
    contention, not the model (a 0.59 ms model once timed at 426 ms), so evaluate records this and warns."""
    def snapshot() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    a = snapshot()
    time.sleep(seconds)
    b = snapshot()
    if a is None or b is None or b[0] <= a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere; "unknown" without either)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:100]
    except OSError:
        pass
    return platform.processor()[:100] or "unknown"


BUSY_WARNING = 0.25  # other work using more than this fraction of the CPUs makes latency figures unreliable


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm folded into the conv before it
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``), the BN replaced by an identity: the same function
    in eval mode, as every deployment runtime (ONNX Runtime, TensorRT, oneDNN graph) runs it. A conv is
    folded with the BN that directly follows it among its parent's children (conv1/bn1, ... and the
    shortcut's Sequential(conv, bn))."""
    folded = copy.deepcopy(model).eval()
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.num_features == conv.out_channels):
                setattr(parent, cname, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bname, nn.Identity())
    return folded
