"""What every stage script shares: file locations, error handling, data loaders, logging."""
from __future__ import annotations

import csv
import io as _stdio
import sys
import time
from pathlib import Path
from typing import Callable

from kdprune import io
from kdprune.data import DatasetError, TensorLoader, load_prepared
from kdprune.io import CheckpointError
from kdprune.params import Params, ParamsError, load_params

PREPARED = Path("data/prepared/dataset.pt")
TEACHER = Path("models/teacher.pt")
PRUNED = Path("models/pruned.pt")
STUDENTS = Path("models/students")
METRICS = Path("metrics")
PLOTS = Path("plots")
LOGS = Path("logs")  # timings: not DVC outputs, so model/metric hashes stay deterministic
CHECKPOINTS = Path("checkpoints")  # resume state of training stages: git-ignored, DVC-ignored, deleted on success


def student_path(variant: str) -> Path:
    return STUDENTS / f"{variant}.pt"


def resume_path(name: str) -> Path:
    """Where a training stage keeps its resume checkpoint (``kdprune.train.fit(checkpoint=...)``)."""
    return CHECKPOINTS / f"{name}.pt"


def finished(name: str) -> None:
    """The stage's outputs are written: its resume checkpoint is no longer needed."""
    resume_path(name).unlink(missing_ok=True)


class StageError(RuntimeError):
    """A stage cannot run for a reason the user can fix; the message says which."""


USER_ERRORS = (ParamsError, DatasetError, CheckpointError, StageError)


def run(main: Callable[[Params], None]) -> None:
    """Validate params, then run ``main``; user errors exit 2 with one clear line, no traceback."""
    try:
        params = load_params()
        main(params)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_data(params: Params) -> dict:
    data = load_prepared(PREPARED)
    if data["name"] != params.data.name:
        raise StageError(f"{PREPARED} holds '{data['name']}' but data.name is '{params.data.name}'; run `dvc repro`")
    return data


def train_loader(params: Params, data: dict, cfg) -> TensorLoader:
    return TensorLoader(data["train_x"], data["train_y"], data["mean"], data["std"], cfg.batch_size, train=True,
                        crop_padding=params.data.crop_padding, hflip=data["hflip"], seed=params.seed,
                        channels_last=params.runtime.channels_last)


def test_loader(params: Params, data: dict) -> TensorLoader:
    return TensorLoader(data["test_x"], data["test_y"], data["mean"], data["std"], params.evaluate.batch_size,
                        train=False, channels_last=params.runtime.channels_last)


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
