"""THE training loop. Teacher training, KD, fine-tuning and scratch all run through ``fit``.

One loss (``losses.kd_loss``): fine-tuning is alpha = 0. When masks are given, the masked
gradients are zeroed before every optimizer step and the masks re-applied after it, so the
non-zero count of a pruned model never changes during recovery.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from kdprune.losses import kd_loss
from kdprune.measure import accuracy
from kdprune.pruning import Masks, apply_masks, mask_grads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_runtime(runtime, seed: int) -> torch.device:
    """Threads, seeds and device. CPU only for now; threads = all cores unless set."""
    threads = runtime.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    seed_everything(seed)
    return torch.device("cpu")


def to_runtime(model: nn.Module, runtime) -> nn.Module:
    """Put a model in the runtime's memory format (channels_last: NHWC, ~2x faster convs on CPU)."""
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def progress_enabled() -> bool:
    return sys.stdout.isatty() and not os.environ.get("CI")


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    # no weight decay on BN parameters and biases (1-d tensors)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_lambda(schedule: str, total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warm-up, then cosine or linear decay to 0."""
    warm = int(round(warmup_frac * total_steps))

    def f(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        if schedule == "onecycle":  # triangular one-cycle: linear up, linear down
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def fit(model: nn.Module, train_loader, test_loader, cfg, *, runtime, teacher: nn.Module | None = None,
        alpha: float = 0.0, temperature: float = 1.0, masks: Masks | None = None, name: str = "train",
        log: Callable[[str], None] = print) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs``; return the per-epoch curve (list of dicts)."""
    if alpha > 0 and teacher is None:
        raise ValueError(f"{name}: alpha = {alpha} needs a teacher")
    to_runtime(model, runtime)
    if teacher is not None:
        to_runtime(teacher, runtime)
    use_teacher = teacher is not None and alpha > 0
    if use_teacher:
        teacher.eval()
    apply_masks(model, masks)
    opt = make_optimizer(model, cfg)
    steps = cfg.epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, steps, cfg.warmup_frac))
    history = []
    show = progress_enabled()
    if show:
        from tqdm import tqdm
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(())
        correct = torch.zeros((), dtype=torch.long)
        seen = 0
        batches = tqdm(train_loader, desc=f"{name} {epoch}/{cfg.epochs}", leave=False) if show else train_loader
        for x, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=runtime.bf16):
                logits = model(x)
                t_logits = None
                if use_teacher:
                    with torch.inference_mode():
                        t_logits = teacher(x)
                    t_logits = t_logits.clone()  # leave inference mode: usable in autograd
            loss = kd_loss(logits, y, t_logits, alpha, temperature, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_grads(model, masks)
            opt.step()
            apply_masks(model, masks)
            sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        train_time = time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": float(loss_sum) / seen,
            "train_acc": 100.0 * float(correct) / seen,
            "epoch_seconds": train_time,
            "images_per_second": seen / train_time,
        }
        evaluate_now = epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0)
        row["test_acc"] = accuracy(model, test_loader) if evaluate_now else float("nan")
        history.append(row)
        test = f"{row['test_acc']:.2f}%" if evaluate_now else "-"
        log(f"{name} epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} train {row['train_acc']:.2f}% "
            f"test {test} lr {row['lr']:.4f} {train_time:.1f}s ({row['images_per_second']:.0f} img/s)")
    return history
