"""Where and how training runs: threads, seeds, the device, CUDA determinism, the memory format."""
from __future__ import annotations

import os
import random
from collections.abc import MutableMapping
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from kdprune.train import distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe_device(device: torch.device) -> str:
    """One line for the log: ``device: cpu (2 threads)`` or ``device: cuda:0 NVIDIA H100 ...``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        text = f"device: cuda:{index} {torch.cuda.get_device_name(index)}"
    else:
        text = f"device: {device.type} ({torch.get_num_threads()} threads)"
    world = distributed.world_size()
    return text + (f", DDP with {world} processes" if world > 1 else "")


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic (Intel, AMD Zen 4)


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo); empty where there is none."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_choice(runtime, device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """(whether training runs under bf16 autocast, why). ``runtime.bf16: true | false`` is taken as set;
    ``auto`` is on for a CUDA GPU with bf16 and for a CPU with native bf16 (``CPU_BF16_FLAGS``), off elsewhere:
    a CPU without them emulates bf16 (5.6x slower than fp32, measured on an AMD EPYC without avx512_bf16)."""
    if runtime.bf16 is not True and runtime.bf16 is not False:  # "auto"
        if device.type == "cuda":
            on = bool(torch.cuda.is_bf16_supported())
            return on, f"runtime.bf16 auto: this GPU {'supports' if on else 'lacks'} bf16"
        found = sorted(set(CPU_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
        if found:
            return True, f"runtime.bf16 auto: this CPU has native bf16 ({', '.join(found)})"
        return False, f"runtime.bf16 auto: this CPU has no native bf16 (none of {', '.join(CPU_BF16_FLAGS)})"
    return bool(runtime.bf16), f"runtime.bf16: {'true' if runtime.bf16 else 'false'}"


def setup_runtime(runtime, seed: int, log: Callable[[str], None] | None = print) -> torch.device:
    """Threads, seeds and device (``runtime.device``; under torchrun on CUDA this rank's GPU, see
    kdprune/train/distributed.py). Threads = all cores unless set, shared among the processes of a node.

    Determinism (tests/train/test_determinism.py): on CPU, the same params + seed give bit-identical outputs
    with the same torch build, CPU type and *thread count*. The thread count changes the reduction
    order of the (bf16 and fp32) conv kernels, so results differ between 1 and 2 threads; set
    ``runtime.threads`` to a fixed number (not 0 = all cores) to reproduce across machines. No
    ``torch.use_deterministic_algorithms`` is needed on CPU: the data order and augmentation come from
    the loader's own seeded generator, and nothing else draws random numbers during training.

    On CUDA, ``runtime.deterministic`` (default true) is :func:`cuda_determinism`; the CPU path does not read it.

    ``log``: where the one line naming the device goes (``describe_device``; rank 0 only); None: nowhere.
    """
    device = distributed.resolve_device(runtime)
    threads = runtime.threads or distributed.default_threads()
    torch.set_num_threads(threads)
    seed_everything(seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        cuda_determinism(runtime.deterministic)
    if log is not None and distributed.is_main():
        on, why = bf16_choice(runtime, device)
        log(f"{describe_device(device)}; training bf16 autocast {'on' if on else 'off'} ({why})")
    return device


CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic results (NVIDIA's cuBLAS docs, "Results reproducibility")


def cuda_determinism(on: bool, env: MutableMapping[str, str] = os.environ) -> None:
    """Bit-identical CUDA runs (``on``) or the fastest kernels (off).

    Off: ``cudnn.benchmark`` times the convolution algorithms and keeps the fastest, which differs from run to run,
    so the same params and seed gave teachers of 92.57 / 92.18 / 92.10 % on one H100. On: no benchmarking,
    cuDNN's deterministic algorithms, ``torch.use_deterministic_algorithms`` (``warn_only``: an op without a
    deterministic CUDA kernel warns instead of failing the stage) and ``CUBLAS_WORKSPACE_CONFIG`` (a value the
    user set is kept). Set before the first cuBLAS call, i.e. at the start of a stage."""
    torch.backends.cudnn.benchmark = not on
    torch.backends.cudnn.deterministic = on
    if on:
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on, warn_only=True)


# oneDNN's fp32 channels-last conv backward corrupts the heap ("double free or corruption", then SIGABRT) when a
# conv's weights have fewer than 8 channels: seen with torch 2.14.1 on a 2-core AMD EPYC without AVX-512, for
# ResNet-8 widths 2 to 7 (width 8 and up, and NCHW weights with NHWC inputs, train fine).
MIN_NHWC_CHANNELS = 8


def nhwc_safe(model: nn.Module) -> bool:
    """Whether ``model``'s weights may go channels-last on the CPU: every conv has at least MIN_NHWC_CHANNELS
    output channels and input channels (an input conv reading 1 to 3 image channels is fine)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return all(c.out_channels >= MIN_NHWC_CHANNELS and (c.in_channels >= MIN_NHWC_CHANNELS or c.in_channels <= 3)
               for c in convs)


def to_runtime(model: nn.Module, runtime) -> nn.Module:
    """Put a model in the runtime's memory format (channels_last: NHWC, ~1.3-2x faster convs on CPU). On the CPU
    a model with very narrow convs stays NCHW (see MIN_NHWC_CHANNELS); its inputs may still be NHWC."""
    if runtime.channels_last:
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if not on_cpu or nhwc_safe(model):
            model.to(memory_format=torch.channels_last)
    return model
