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

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from kdprune import distributed, io
from kdprune.errors import UserError
from kdprune.features import LayerTap, check_layers, default_layers
from kdprune.losses import at_loss, kd_loss
from kdprune.measure import accuracy
from kdprune.models import spec_of
from kdprune.pruning import AGPSchedule, Masks, apply_masks, count_prunable, mask_grads


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


def setup_runtime(runtime, seed: int, log: Callable[[str], None] | None = print) -> torch.device:
    """Threads, seeds and device (``runtime.device``; under torchrun on CUDA this rank's GPU, see
    kdprune/distributed.py). Threads = all cores unless set, shared among the processes of a node.

    Determinism (tests/test_determinism.py): on CPU, the same params + seed give bit-identical outputs
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
        log(describe_device(device))
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


RESUME_FORMAT = "kdprune-resume-v1"


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _spec(model: nn.Module | None) -> dict | None:
    """The model's spec (kdprune.models), None for a module built elsewhere."""
    try:
        return spec_of(model) if model is not None else None
    except ValueError:
        return None


def run_fingerprint(model: nn.Module, train_loader, test_loader, cfg, runtime, teacher, alpha: float,
                    temperature: float, masks: Masks | None, at_beta: float = 0.0,
                    prune_schedule: AGPSchedule | None = None, at_layers: list[str] | None = None) -> str:
    """Identity of everything a training run depends on; a resume checkpoint is only used when it matches."""
    h = hashlib.sha256()
    cfg_d = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_every"}
    extra = {"at_layers": at_layers} if at_beta > 0 else {}
    h.update(json.dumps({"cfg": cfg_d, "runtime": dataclasses.asdict(runtime), "alpha": alpha,
                         "temperature": temperature, "spec": _spec(model), **extra,
                         "teacher_spec": _spec(teacher) if alpha > 0 or at_beta > 0 else None,
                         "at_beta": at_beta, "agp": prune_schedule.config() if prune_schedule else None,
                         "loader": [getattr(train_loader, a, None) for a in ("batch_size", "pad", "hflip")],
                         "device": next(model.parameters()).device.type, "world_size": distributed.world_size()},
                        sort_keys=True, default=str).encode())
    for _, t in sorted(model.state_dict().items()):
        _hash_tensor(h, t)
    if teacher is not None and (alpha > 0 or at_beta > 0):
        for _, t in sorted(teacher.state_dict().items()):
            _hash_tensor(h, t)
    for _, m in sorted((masks or {}).items()):
        _hash_tensor(h, m)
    for loader in (train_loader, test_loader):
        for a in ("x", "y", "mean", "inv_std", "index_digest"):  # index_digest: the files of a StreamLoader
            if isinstance(getattr(loader, a, None), torch.Tensor):
                _hash_tensor(h, getattr(loader, a))
    gen = getattr(train_loader, "generator", None)
    if gen is not None:
        _hash_tensor(h, gen.get_state())
    return h.hexdigest()


def _rng_state(train_loader) -> dict[str, Any]:
    py = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    gen = getattr(train_loader, "generator", None)
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
            "torch": torch.get_rng_state(),
            "loader": gen.get_state() if gen is not None else None}


def _set_rng_state(state: dict[str, Any], train_loader) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["loader"] is not None:
        train_loader.generator.set_state(state["loader"])


def _load_resume(path: Path, fingerprint: str, name: str, log: Callable[[str], None]) -> dict | None:
    """The resume state at ``path`` if it belongs to this run; otherwise None (and say why)."""
    if not path.exists():
        return None
    try:
        state = io.torch_load(path)
    except io.CheckpointError as e:
        log(f"{name}: ignoring resume checkpoint: {e}; starting from epoch 0")
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log(f"{name}: ignoring {path}: not a kdprune resume checkpoint; starting from epoch 0")
        return None
    if state.get("fingerprint") != fingerprint:
        log(f"{name}: ignoring stale {path}: it was written for other params or inputs; starting from epoch 0")
        return None
    return state


def fit(model: nn.Module, train_loader, test_loader, cfg, *, runtime, teacher: nn.Module | None = None,
        alpha: float = 0.0, temperature: float = 1.0, masks: Masks | None = None, name: str = "train",
        log: Callable[[str], None] = print, checkpoint: str | os.PathLike | None = None, at_beta: float = 0.0,
        prune_schedule: AGPSchedule | None = None, section: str | None = None,
        heartbeat: Heartbeat | None = None, at_layers: list[str] | None = None) -> list[dict]:
    """Train ``model`` in place for ``cfg.epochs``; return the per-epoch curve (list of dicts).

    ``checkpoint``: resume file (see the module docstring); used when ``cfg.checkpoint_every > 0``.
    ``at_beta``: weight of the attention-transfer term (``at_beta / 2 * losses.at_loss``) on the outputs of the
    modules ``at_layers`` (default: the zoo's residual stages; kdprune.features); needs a teacher.
    ``prune_schedule``: gradual pruning (AGP). ``masks`` must then be a dict that ``fit`` updates *in place*
    at the schedule's steps, so the caller holds the final masks afterwards.
    ``section``: the params section of ``cfg`` (teacher, distill), named in errors; default ``name``.
    Progress: a tqdm bar on a terminal; otherwise (rank 0) a ``log`` line whenever ``heartbeat`` is due,
    by default every ``PROGRESS_EVERY_S`` seconds.

    A NaN or infinite loss raises :class:`TrainingDiverged` (checked every ``DIVERGENCE_CHECK_STEPS`` steps and
    at each epoch's end) before any resume checkpoint of the diverged state is written.
    """
    section = section or name
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
    use_teacher = teacher is not None and (alpha > 0 or at_beta > 0)
    if use_teacher:
        teacher.eval()
    apply_masks(model, masks)
    opt = make_optimizer(model, cfg)
    steps = cfg.epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, steps, cfg.warmup_frac))
    history: list[dict] = []
    start = 0
    state = _load_resume(Path(checkpoint), fingerprint, name, log) if every else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], train_loader)
        if prune_schedule is not None and state["masks"] is not None:  # the masks AGP had reached
            masks.clear()
            masks.update({k: m.to(device) for k, m in state["masks"].items()})
        start, history = int(state["epoch"]), list(state["history"])
        log(f"{name}: resuming from {checkpoint} at epoch {start}/{cfg.epochs}")
    net = distributed.wrap(model)  # DDP under torchrun, else the model itself; read and save `model`
    taps = (LayerTap(model, at_layers), LayerTap(teacher, at_layers)) if at_beta > 0 else None
    try:
        show = progress_enabled()
        if show:
            from tqdm import tqdm
        elif distributed.is_main():
            heartbeat = heartbeat or Heartbeat()
        else:
            heartbeat = None
        n_batches = len(train_loader)
        step = start * len(train_loader)
        for epoch in range(start + 1, cfg.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            batches = tqdm(train_loader, desc=f"{name} {epoch}/{cfg.epochs}", leave=False) if show else train_loader
            for batch, (x, y) in enumerate(batches, 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=runtime.bf16):
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
                    "scheduler": sched.state_dict(), "rng": _rng_state(train_loader),
                    "masks": {k: v.cpu() for k, v in masks.items()} if masks else None})
            test = f"{row['test_acc']:.2f}%" if evaluate_now else "-"
            log(f"{name} epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} train {row['train_acc']:.2f}% "
                f"test {test} lr {row['lr']:.4f} {train_time:.1f}s ({row['images_per_second']:.0f} img/s)")
        return history
    finally:
        for tap in taps or ():
            tap.remove()
