"""What every stage script shares: file locations, error handling, data loaders, logging."""
from __future__ import annotations

import argparse
import csv
import io as _stdio
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from kdprune import checkpoint, io, runlock
from kdprune.data import DatasetError, TensorLoader, load_prepared, streaming
from kdprune.errors import UserError
from kdprune.io import CheckpointError, ExportError, OutputError
from kdprune.params import DataParams, ModelParams, Params, ParamsError, flatten, load_params
from kdprune.train import distributed

PREPARED = Path("data/prepared/dataset.pt")
TEACHER = Path("models/teacher.pt")
PRUNED = Path("models/pruned.pt")
STUDENTS = Path("models/students")
METRICS = Path("metrics")
PLOTS = Path("plots")
LOGS = Path("logs")  # timings: not DVC outputs, so model/metric hashes stay deterministic
CHECKPOINTS = Path("checkpoints")  # resume state of training stages: git-ignored, DVC-ignored, deleted on success


def load_model(path: Path, model: ModelParams, expect_classes: int | None = None):
    """``checkpoint.load_checkpoint`` of a model of this project (``model``: the params' model section): the only
    custom factory it may import is ``model.factory`` (None unless ``model.arch: custom``). Returns
    ``(model, masks, meta)``."""
    # the teacher must be of params.yaml's model (another arch/depth/width/name is refused, not pruned silently);
    # a pruned model's spec has its own channel counts
    expect_model = model if Path(path) == TEACHER else None
    return checkpoint.load_checkpoint(path, expect_classes, expect_model=expect_model, allowed_factory=model.factory)


def student_path(variant: str) -> Path:
    return STUDENTS / f"{variant}.pt"


def resume_path(name: str) -> Path:
    """Where a training stage keeps its resume checkpoint (``kdprune.train.loop.fit(checkpoint=...)``)."""
    return CHECKPOINTS / f"{name}.pt"


def finished(name: str) -> None:
    """The stage's outputs are written: its resume checkpoint is no longer needed."""
    resume_path(name).unlink(missing_ok=True)


class StageError(RuntimeError):
    """A stage cannot run for a reason the user can fix; the message says which."""


USER_ERRORS = (ParamsError, DatasetError, CheckpointError, ExportError, OutputError, StageError, UserError)


def parse_args(doc: str | None, argv: list[str] | None = None,
               configure: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The stage's command line: ``--help`` prints ``doc`` and exits 0 before any work.

    A stage reads everything else from params.yaml, so by default it takes no arguments;
    ``configure`` may add some. Call it first thing in the script's ``__main__`` block (``run(doc=...)`` does).
    """
    module = distributed.main_module()
    prog = f"python -m {module}" if module else None
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Its settings come from params.yaml; DVC runs it as a stage of dvc.yaml.")
    if configure is not None:
        configure(ap)
    return ap.parse_args(argv)


def run(main: Callable[[Params], None], ddp: bool = False, doc: str | None = None) -> None:
    """Validate params, then run ``main``; user errors exit 2 with one clear line, no traceback.

    ``ddp``: a training stage; with ``runtime.nproc_per_node > 1`` it re-executes itself
    under torchrun, and under torchrun ``main`` runs inside the DDP process group (kdprune/train/distributed.py).
    ``doc``: the stage's docstring; given, the command line is parsed first (``parse_args``), so
    ``--help`` prints it and exits 0 and an unknown argument exits 2, before anything is read or written.
    """
    if doc is not None:
        parse_args(doc)
    try:
        params = load_params()
        # one pipeline at a time in a workspace, each stage on the params it started with (kdprune/runlock.py)
        runlock.enter(flatten(params.to_dict()))
        if ddp:
            distributed.relaunch_if_needed(params.runtime)
            with distributed.process_group(params.runtime, log=log):
                main(params)
        else:
            main(params)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def log(msg: str) -> None:
    if distributed.is_main():  # under DDP only rank 0 speaks
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_data(data_params: DataParams) -> dict:
    """The prepared dataset, which must be the one of the params' data section."""
    data = load_prepared(PREPARED)
    if data["name"] != data_params.name:
        raise StageError(f"{PREPARED} holds '{data['name']}' but data.name is '{data_params.name}'; run `dvc repro`")
    return data


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A dataset tensor on ``device``: copied once, from pinned memory, to a GPU; unchanged on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def train_loader(params: Params, data: dict, cfg, device: torch.device | str = "cpu") -> TensorLoader:
    """The training batches on ``device``; under DDP this rank's shard of each global ``cfg.batch_size`` batch."""
    kw = dict(train=True, crop_padding=params.data.crop_padding, hflip=data["hflip"], seed=params.seed,
              device=device, channels_last=params.runtime.channels_last)
    world = distributed.world_size()
    if world > 1:
        section = next((s for s in ("teacher", "distill") if getattr(params, s) is cfg), "<section>")
        distributed.check_batch_size(cfg.batch_size, f"{section}.batch_size")
    if data.get("loader") == "stream":  # an image folder's decoded array on disk (kdprune/data/streaming.py)
        return streaming.StreamLoader(streaming.split_array(data, "train", params.data.num_workers), data["train_y"],
                                      data["mean"], data["std"], cfg.batch_size, rank=distributed.rank(),
                                      world=world, **kw)
    x, y = to_device(data["train_x"], device), to_device(data["train_y"], device)
    if world == 1:
        return TensorLoader(x, y, data["mean"], data["std"], cfg.batch_size, **kw)
    return distributed.ShardedLoader(x, y, data["mean"], data["std"], cfg.batch_size, rank=distributed.rank(),
                                     world=world, **kw)


def test_loader(params: Params, data: dict, device: torch.device | str = "cpu") -> TensorLoader:
    if data.get("loader") == "stream":
        return streaming.StreamLoader(streaming.split_array(data, "test", params.data.num_workers), data["test_y"],
                                      data["mean"], data["std"], params.evaluate.batch_size, train=False,
                                      device=device, channels_last=params.runtime.channels_last)
    return TensorLoader(to_device(data["test_x"], device), to_device(data["test_y"], device), data["mean"],
                        data["std"], params.evaluate.batch_size, train=False, device=device,
                        channels_last=params.runtime.channels_last)


TRAIN_EVAL = 10_000  # training images scored per variant (train_acc_<variant>): ~1/6 of a test pass per 10k


def train_eval_indices(n: int, limit: int = TRAIN_EVAL) -> torch.Tensor:
    """``min(n, limit)`` evenly spaced indices into a split of ``n`` (the same for every seed and variant;
    splits are stored class by class or shuffled, and even spacing covers every class either way)."""
    k = min(n, limit)
    return torch.div(torch.arange(k, dtype=torch.int64) * n, k, rounding_mode="floor") if k else torch.zeros(0, dtype=torch.int64)


def train_eval_loader(params: Params, data: dict, device, limit: int = TRAIN_EVAL):
    """Unaugmented batches of the fixed training subset (train_eval_indices, at most ``limit`` images), on the
    tensor or stream path; evaluate calibrates INT8 on ``quantize.calibration_images`` of them."""
    y = data["train_y"]
    idx = train_eval_indices(len(y), limit)
    common = dict(batch_size=params.evaluate.batch_size, train=False, device=device,
                  channels_last=params.runtime.channels_last)
    if data.get("loader") == "stream":
        return streaming.StreamLoader(streaming.split_array(data, "train", params.data.num_workers), y[idx],
                                      data["mean"], data["std"], rows=idx, **common)
    return TensorLoader(to_device(data["train_x"][idx], device), to_device(y[idx], device),
                        data["mean"], data["std"], **common)


def data_meta(data: dict) -> dict:
    return {"dataset": data["name"], "classes": data["classes"], "mean": data["mean"], "std": data["std"],
            "input_shape": list(data["train_x"].shape[1:])}


def write_curve(path: Path, history: list[dict], columns=("epoch", "lr", "train_loss", "train_acc", "test_acc")) -> None:
    """Per-epoch curve as CSV (deterministic columns only; timings go to logs/)."""
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    io.write_text(path, buf.getvalue())


def write_timing(name: str, history: list[dict] | None = None, **extra) -> None:
    rec = dict(extra)
    if history:
        rec["epoch_seconds"] = [round(r["epoch_seconds"], 3) for r in history]
        rec["images_per_second"] = [round(r["images_per_second"], 1) for r in history]
        rec["train_seconds"] = round(sum(r["epoch_seconds"] for r in history), 3)
    io.write_json(LOGS / f"{name}.json", rec)
