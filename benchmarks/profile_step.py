"""Where a training step's time goes: torch.profiler over a few steps of kdprune's loop.

  python benchmarks/profile_step.py [--steps 20] [--kd]

Prints the top operators by self CPU time for the default params (params.yaml), including the
tensor augmentation and the mask upkeep, so a change in the loop can be judged by what it costs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprune.data import TensorLoader, prepare_dataset  # noqa: E402
from kdprune.train.losses import kd_loss  # noqa: E402
from kdprune.models import build_model, spec_from_params  # noqa: E402
from kdprune.params import load_params  # noqa: E402
from kdprune.prune.masks import apply_masks, global_magnitude_masks, mask_grads  # noqa: E402
from kdprune.train.loop import make_optimizer  # noqa: E402
from kdprune.train.runtime import bf16_choice, setup_runtime, to_runtime  # noqa: E402


def profile_steps(steps: int = 20, kd: bool = False, data: dict | None = None, row_limit: int = 15) -> str:
    params = load_params(ROOT / "params.yaml")
    setup_runtime(params.runtime, params.seed)
    if data is None:
        data = prepare_dataset(params.data.name, params.data.root, False, 0, 0, params.seed)
    cfg = params.distill if kd else params.teacher
    loader = TensorLoader(data["train_x"], data["train_y"], data["mean"], data["std"], cfg.batch_size, train=True,
                          crop_padding=params.data.crop_padding, hflip=data["hflip"], seed=0,
                          channels_last=params.runtime.channels_last)
    spec = spec_from_params(params.model, data["train_x"].shape[1], len(data["classes"]))
    model = build_model(spec)
    masks = global_magnitude_masks(model, params.prune.ratio) if kd else None  # before channels_last
    model = to_runtime(model, params.runtime)
    teacher = to_runtime(build_model(spec), params.runtime).eval() if kd else None
    opt = make_optimizer(model, cfg)
    rt = params.runtime
    alpha = params.distill.alpha if kd else 0.0

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_choice(rt, torch.device("cpu"))[0]):
            logits = model(x)
            t = None
            if kd:
                with record_function("teacher_forward"), torch.inference_mode():
                    t = teacher(x)
                t = t.clone()
        loss = kd_loss(logits, y, t, alpha, params.distill.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with record_function("mask_upkeep"):
            mask_grads(model, masks)
        opt.step()
        with record_function("mask_upkeep"):
            apply_masks(model, masks)

    def forever():
        while True:
            yield from loader

    it = forever()
    for _ in range(3):
        step(*next(it))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("augment_batch"):
                x, y = next(it)
            step(x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kd", action="store_true", help="profile a KD recovery step (teacher forward + masks)")
    args = ap.parse_args()
    print(profile_steps(args.steps, args.kd))


if __name__ == "__main__":
    main()
