"""THE training loop. Teacher training, KD, fine-tuning and scratch all run through ``fit``.

One loss (``losses.kd_loss``): fine-tuning is alpha = 0. When masks are given, the masked
gradients are zeroed before every optimizer step and the masks re-applied after it, so the
non-zero count of a pruned model never changes during recovery.

Resume: with ``checkpoint=<path>`` and ``cfg.checkpoint_every = N > 0``, ``fit`` saves its whole
state (model, optimizer, scheduler, masks, the Python/numpy/torch RNG states, the batch loader's
generator, the epoch and the curve so far) every N epochs and after the last one, atomically
(``io.torch_save``: temp file + ``os.replace``). On the next call it resumes from that file when the
file's *fingerprint* matches this run (training params, model spec and initial weights, masks,
teacher weights, loss settings, data and loader seed); a stale, corrupted or unsafe file is
ignored and training starts over. A resumed run ends with exactly the weights of an
uninterrupted one. The caller deletes the file once its outputs are written.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from kdprune import io
from kdprune.errors import UserError
from kdprune.measure import accuracy
from kdprune.prune.agp import AGPSchedule
from kdprune.prune.counts import count_prunable
from kdprune.prune.masks import Masks, apply_masks, mask_grads
from kdprune.train import distributed
from kdprune.train.features import LayerTap, check_layers, default_layers
from kdprune.train.losses import at_loss, kd_loss
from kdprune.train.objective import PLAIN, Objective
from kdprune.train.resume import RESUME_FORMAT, load_resume, rng_state, run_fingerprint, set_rng_state
from kdprune.train.runtime import bf16_choice, to_runtime


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite: the run cannot produce a model worth saving."""


# Checked every this many steps (one host sync each) as well as at every epoch's end, so a diverged run stops
# within seconds instead of finishing a long epoch of NaNs.
DIVERGENCE_CHECK_STEPS = 50


def diverged(name: str, section: str, epoch: int, step: int, cfg, loss: float) -> TrainingDiverged:
    hint = (f"{section}.lr = {cfg.lr:g}, {section}.weight_decay = {cfg.weight_decay:g}"
            + (", distill.temperature / alpha / at_beta" if section == "distill" else "")
            + ", or a constant (zero-std) dataset")
    return TrainingDiverged(f"{name}: training diverged at epoch {epoch} (step {step}): loss is {loss}; "
                            f"likely too large: {hint}. No outputs were written")


def progress_enabled() -> bool:
    return sys.stdout.isatty() and not os.environ.get("CI") and distributed.is_main()


PROGRESS_EVERY_S = 30.0  # without a terminal (logs, dvc queue): a progress line at least this often


class Heartbeat:
    """Progress for logs: ``due()`` is true once ``every`` seconds have passed since the last line.

    A progress bar needs a terminal; under ``dvc queue`` or in a log file a long epoch would
    otherwise print nothing until it ends. ``clock`` is injectable for tests.
    """

    def __init__(self, every: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = every, clock
        self.last = clock()

    def due(self) -> bool:
        now = self.clock()
        if now - self.last < self.every:
            return False
        self.last = now
        return True


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


def fit(model: nn.Module, train_loader, test_loader, cfg, *, runtime, objective: Objective = PLAIN,
        masks: Masks | None = None, prune_schedule: AGPSchedule | None = None, name: str = "train",
        section: str | None = None, log: Callable[[str], None] = print, checkpoint: str | os.PathLike | None = None,
        heartbeat: Heartbeat | None = None) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs``; return the per-epoch curve (list of dicts).

    ``checkpoint``: resume file (see the module docstring); used when ``cfg.checkpoint_every > 0``.
    ``objective``: the teacher and the loss weights (kdprune/train/objective.py); the default is cross-entropy only.
    ``prune_schedule``: gradual pruning (AGP). ``masks`` must then be a dict that ``fit`` updates *in place*
    at the schedule's steps, so the caller holds the final masks afterwards.
    ``section``: the params section of ``cfg`` (teacher, distill), named in errors; default ``name``.
    Progress: a tqdm bar on a terminal; otherwise (rank 0) a ``log`` line whenever ``heartbeat`` is due,
    by default every ``PROGRESS_EVERY_S`` seconds.

    A NaN or infinite loss raises :class:`TrainingDiverged` (checked every ``DIVERGENCE_CHECK_STEPS`` steps and
    at each epoch's end) before any resume checkpoint of the diverged state is written.
    """
    section = section or name
    teacher, alpha, temperature = objective.teacher, objective.alpha, objective.temperature
    at_beta, at_layers = objective.at_beta, objective.at_layers
    if (alpha > 0 or at_beta > 0) and teacher is None:
        raise ValueError(f"{name}: alpha = {alpha}, at_beta = {at_beta} need a teacher")
    if prune_schedule is not None and masks is None:
        raise ValueError(f"{name}: gradual pruning needs a masks dict to update in place (pass {{}})")
    if at_beta > 0:
        at_layers = list(at_layers) if at_layers else default_layers(model)
        check_layers(at_layers, model, teacher)
    every = getattr(cfg, "checkpoint_every", 0) if checkpoint is not None else 0
    fingerprint = (run_fingerprint(model, train_loader, test_loader, cfg, runtime, teacher, alpha, temperature,
                                   masks, at_beta, prune_schedule, at_layers) if every else "")
    device = next(model.parameters()).device  # train where the model is (the stage put it on its device)
    to_runtime(model, runtime)
    if teacher is not None:
        to_runtime(teacher.to(device), runtime)
    for k in list(masks or {}):  # in place: with AGP the caller reads the final masks from this dict
        masks[k] = masks[k].to(device)
    use_teacher = objective.uses_teacher
    if use_teacher:
        teacher.eval()
    apply_masks(model, masks)
    opt = make_optimizer(model, cfg)
    steps = cfg.epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, steps, cfg.warmup_frac))
    history: list[dict] = []
    start = 0
    state = load_resume(Path(checkpoint), fingerprint, name, log) if every else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], train_loader)
        if prune_schedule is not None and state["masks"] is not None:  # the masks AGP had reached
            masks.clear()
            masks.update({k: m.to(device) for k, m in state["masks"].items()})
        start, history = int(state["epoch"]), list(state["history"])
        log(f"{name}: resuming from {checkpoint} at epoch {start}/{cfg.epochs}")
    net = distributed.wrap(model)  # DDP under torchrun, else the model itself; read and save `model`
    taps = (LayerTap(model, at_layers), LayerTap(teacher, at_layers)) if at_beta > 0 else None
    try:
        show = progress_enabled()
        if not show:
            heartbeat = (heartbeat or Heartbeat()) if distributed.is_main() else None
        n_batches = len(train_loader)
        bf16 = bf16_choice(runtime, device)[0]  # runtime.bf16: true | false | auto (the hardware's bf16)
        step = start * len(train_loader)
        for epoch in range(start + 1, cfg.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            batches = tqdm(train_loader, desc=f"{name} {epoch}/{cfg.epochs}", leave=False) if show else train_loader
            for batch, (x, y) in enumerate(batches, 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = net(x)
                    feats = taps[0].take() if taps else None
                    t_logits = None
                    if use_teacher:
                        with torch.inference_mode():
                            t_out = teacher(x)
                            t_maps = taps[1].take() if taps else []
                        # leave inference mode: clones are usable in autograd
                        t_logits, t_feats = t_out.clone(), [f.clone() for f in t_maps]
                loss = kd_loss(logits, y, t_logits if alpha > 0 else None, alpha, temperature, cfg.label_smoothing)
                if at_beta > 0:
                    loss = loss + (at_beta / 2) * at_loss(feats, t_feats, at_layers)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                mask_grads(model, masks)
                opt.step()
                step += 1
                if prune_schedule is not None:
                    new = prune_schedule.masks_at(model, step)
                    if new is not None:
                        masks.clear()
                        masks.update(new)
                apply_masks(model, masks)
                sched.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if (step % DIVERGENCE_CHECK_STEPS == 0 and distributed.world_size() == 1
                        and not torch.isfinite(loss_sum)):
                    raise diverged(name, section, epoch, step, cfg, float(loss.detach()))
                if heartbeat is not None and heartbeat.due():  # this rank's running figures; syncs a GPU once
                    log(f"{name} epoch {epoch}/{cfg.epochs} batch {batch}/{n_batches} "
                        f"loss {float(loss_sum) / seen:.4f} {seen / max(time.perf_counter() - t0, 1e-9):.0f} img/s")
            loss_sum, correct, seen = distributed.sum_over_ranks(loss_sum, correct, seen)  # DDP: all ranks' shards
            if not torch.isfinite(loss_sum):  # the same sum on every rank: all of them stop here
                raise diverged(name, section, epoch, step, cfg, float(loss_sum) / max(seen, 1))
            if loss_sum.is_cuda:
                torch.cuda.synchronize(loss_sum.device)  # CUDA runs asynchronously: time the work, not its queueing
            train_time = time.perf_counter() - t0
            row = {
                "epoch": epoch,
                "lr": opt.param_groups[0]["lr"],
                "train_loss": float(loss_sum) / seen,
                "train_acc": 100.0 * float(correct) / seen,
                "epoch_seconds": train_time,
                "images_per_second": seen / train_time,
            }
            if prune_schedule is not None:
                total, nonzero = count_prunable(model, prune_schedule.include_first_conv,
                                                prune_schedule.include_last_fc)
                row["prunable_sparsity"] = 1.0 - nonzero / total
            evaluate_now = epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0)
            # DDP: rank 0 measures the unwrapped model (= the saved one) on the whole test split
            row["test_acc"] = accuracy(model, test_loader) if evaluate_now and distributed.is_main() else float("nan")
            history.append(row)
            if every and (epoch % every == 0 or epoch == cfg.epochs) and distributed.is_main():
                io.torch_save(checkpoint, {
                    "format": RESUME_FORMAT, "fingerprint": fingerprint, "epoch": epoch, "epochs": cfg.epochs,
                    "history": history, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": rng_state(train_loader),
                    "masks": {k: v.cpu() for k, v in masks.items()} if masks else None})
            test = f"{row['test_acc']:.2f}%" if evaluate_now else "-"
            log(f"{name} epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} train {row['train_acc']:.2f}% "
                f"test {test} lr {row['lr']:.4f} {train_time:.1f}s ({row['images_per_second']:.0f} img/s)")
        return history
    finally:
        for tap in taps or ():
            tap.remove()
