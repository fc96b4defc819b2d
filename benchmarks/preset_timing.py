"""Time a preset at full model size on synthetic tensors of the real data shape (issue #5, item 7).

A GPU machine here has no network, so real CIFAR cannot be used; images/s do not depend on pixel
values, so random uint8 images of the dataset's shape and class count stand in. The script runs the
preset's own params (model, batch sizes, device, bf16, channels_last) through the real loop
(``kdprune.train.loop.fit``: tensor-resident data on the device, batched augmentation) for a few hundred
steps of teacher training and of KD (teacher forward under inference_mode + student step), after
warm-up steps, and projects the preset's wall time: epochs x images / (images/s), plus evaluation.

  python benchmarks/preset_timing.py cifar100-resnet152            # on whatever device runtime.device picks
  python benchmarks/preset_timing.py cifar100-resnet152 --steps 200 --json out.json

Measured on an H100 on 2026-11-26: see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprune import presets  # noqa: E402
from kdprune.data import REGISTRY, TensorLoader  # noqa: E402
from kdprune.models import build_model, spec_from_params  # noqa: E402
from kdprune.train.loop import fit  # noqa: E402
from kdprune.train.objective import Objective  # noqa: E402
from kdprune.train.runtime import setup_runtime, to_runtime  # noqa: E402

TRAIN_SIZES = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257, "mnist": 60000, "fashion_mnist": 60000}


def synthetic(info, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, info.channels, *info.image_size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, len(info.classes), (n,), generator=g)
    return x, y


def images_per_second(model, teacher, params, cfg, device, steps: int, warmup: int, alpha: float) -> float:
    """Training images/s of ``fit`` over ``steps`` batches, after ``warmup`` untimed batches."""
    info = REGISTRY[params.data.name]
    bs = cfg.batch_size
    x, y = synthetic(info, bs * (steps + warmup))
    x, y = x.to(device), y.to(device)

    def loader(lo: int, hi: int, train: bool = True) -> TensorLoader:
        return TensorLoader(x[lo:hi], y[lo:hi], list(info.mean), list(info.std), bs, train=train,
                            crop_padding=params.data.crop_padding if train else 0, hflip=info.hflip and train,
                            device=device, channels_last=params.runtime.channels_last)

    run_cfg = dataclasses.replace(cfg, epochs=1, eval_every=0, checkpoint_every=0)
    kw = dict(runtime=params.runtime, objective=Objective(teacher, alpha, params.distill.temperature),
              log=lambda m: None)
    fit(model, loader(0, bs * warmup), loader(0, bs, train=False), run_cfg, **kw)  # cuDNN autotune, allocator
    history = fit(model, loader(bs * warmup, bs * (warmup + steps)), loader(0, bs, train=False), run_cfg, **kw)
    return history[-1]["images_per_second"]  # fit's own timing of the training epoch (no evaluation in it)


def run(name: str, steps: int = 100, warmup: int = 10) -> dict:
    params, _ = presets.resolve(name)
    device = setup_runtime(params.runtime, params.seed)
    info = REGISTRY[params.data.name]
    spec = spec_from_params(params.model, info.channels, len(info.classes))
    teacher = to_runtime(build_model(spec).to(device), params.runtime)
    teacher_ips = images_per_second(teacher, None, params, params.teacher, device, steps, warmup, 0.0)
    student = to_runtime(build_model(spec).to(device), params.runtime)
    kd_ips = images_per_second(student, teacher, params, params.distill, device, steps, warmup, params.distill.alpha)
    n = TRAIN_SIZES[params.data.name]
    hours = {"teacher": params.teacher.epochs * n / teacher_ips / 3600,
             "kd": params.distill.epochs * n / kd_ips / 3600}
    # every other variant (finetune) costs about a teacher-free student step: bounded by the KD figure
    hours["all_variants_upper"] = hours["teacher"] + len(params.distill.variants) * hours["kd"]
    return {"preset": name, "device": str(device), "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__, "params_millions": sum(p.numel() for p in teacher.parameters()) / 1e6,
            "batch_size_teacher": params.teacher.batch_size, "batch_size_distill": params.distill.batch_size,
            "steps_timed": steps, "teacher_img_s": teacher_ips, "kd_img_s": kd_ips, "projected_hours": hours}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res = run(args.preset, args.steps, args.warmup)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
