"""One pipeline result, collected from the files the stages wrote (params.yaml, metrics/, plots/, logs/,
models/export/): what one MLflow run holds (see kdprune/tracking/__init__.py), its fingerprint, name, source tags
and the pipeline's real start and end time.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from kdprune import metrics as metrics_files
from kdprune.params import flatten, safe_load_yaml
from kdprune.tracking.store import TrackingUserError

RATIO_METRICS = ("compression_ratio", "prunable_compression_ratio", "mac_reduction")


def _git(cwd: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit(cwd: Path) -> str:
    return _git(cwd, "rev-parse", "HEAD") or "unknown"


def source_tags(cwd: Path, repo: Path) -> dict[str, str]:
    """MLflow's source tags (the UI's Source column): the pipeline (``<repo dir>/dvc.yaml``; ``repo`` is the
    main repo, also for a temp DVC workspace), its git commit and repo URL where known."""
    from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL,  # heavy optional dep.
                                          MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE)

    tags = {MLFLOW_SOURCE_NAME: f"{repo.name or 'repo'}/dvc.yaml", MLFLOW_SOURCE_TYPE: "PROJECT"}
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
        branch = _git(cwd, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[MLFLOW_GIT_BRANCH] = branch
    url = _git(cwd, "config", "--get", "remote.origin.url")
    if url:
        tags[MLFLOW_GIT_REPO_URL] = url
    return tags


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _headline_key(key: str) -> bool:
    return key.startswith("acc_") or key in RATIO_METRICS


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise TrackingUserError(f"{path}: not valid JSON ({str(e)[:200]}); nothing logged (rerun the stage that "
                                "wrote it)") from None
    if not isinstance(data, dict):
        raise TrackingUserError(f"{path}: expected a JSON object, got {type(data).__name__}; nothing logged")
    return data


def result_files(workdir: Path) -> list[Path]:
    """The result's metrics files, in stage order (evaluate last): see kdprune/metrics.py."""
    return metrics_files.files(workdir)


def result_metrics(workdir: Path, variants: list[str]) -> dict[str, float]:
    """The result's metrics, merged from its files: everything numeric in evaluate.json, and from the other
    files the metrics of one model (``acc_*``, ``*_teacher``, ``*_pruned``, ``*_<variant>``), the
    compression ratios, MAC reduction and sparsities (their generic keys, such as ``epochs``, are not
    metrics of the result). Works whether evaluate.json repeats the stages' headline numbers or each
    metric lives in one file.

    Refused with one line naming the file and key (:class:`TrackingUserError`, nothing logged): an
    accuracy or compression number that is NaN, infinite or not a number, and a headline number (teacher,
    pruned, every variant, both compression ratios) that no file holds."""
    suffixes = tuple(f"_{m}" for m in ("teacher", "pruned", *variants))
    shared = RATIO_METRICS + ("sparsity", "prunable_sparsity")
    out: dict[str, float] = {}
    for path in result_files(workdir):
        if not path.exists():
            continue
        for key, v in _read_json(path).items():
            if _headline_key(key) and not (_is_number(v) and math.isfinite(v)):
                raise TrackingUserError(f"{path}: {key} = {v!r} is not a finite number; nothing logged "
                                        "(rerun the stage that wrote it)")
            if _is_number(v) and (path.name == "evaluate.json" or key.startswith("acc_") or key.endswith(suffixes)
                                  or key in shared):
                out[key] = float(v)
    need = ["acc_teacher", "acc_pruned", *(f"acc_{v}" for v in variants), "compression_ratio",
            "prunable_compression_ratio"]
    for key in need:
        if key not in out:
            raise TrackingUserError(f"{workdir / 'metrics'}: {key} is missing (no metrics file holds it: "
                                    f"{', '.join(str(p.relative_to(workdir)) for p in result_files(workdir))}); "
                                    "nothing logged (rerun `dvc repro`)")
    return out


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics as shown in MLflow: accuracies rounded to 0.01 pt, ratios (compression, MAC reduction,
    speed-ups, sparsity) to 3 significant digits; everything else unchanged."""
    out = {}
    for k, v in metrics.items():
        if k.startswith("acc_"):
            v = round(v, 2)
        elif k in RATIO_METRICS or k.startswith("speedup_") or k.endswith("sparsity"):
            v = float(f"{v:.3g}")
        out[k] = v
    return out


VALIDATED = Path("data") / "params.valid"  # stages/validate.py's marker, rewritten at the start of every invocation
STAGE_GAP_S = 120.0  # a stage log that ended this long before the next stage began is from an earlier invocation


def pipeline_times(workdir: Path, result_files: list[Path]) -> tuple[int, int, str]:
    """(start, end) of the pipeline invocation that wrote ``result_files``, in ms since the epoch, and how.

    end: the newest modification time of the result files and of the stage timing logs.
    start: from ``logs/*.json`` (each training stage's ``wall_seconds``, ending at the log's mtime),
    walking back from the newest: a stage is part of this invocation while it ended at most
    ``STAGE_GAP_S`` before the next one began; an earlier log belongs to a stage DVC did not rerun
    (unchanged or restored from its cache). Without logs: the oldest result file's mtime. ``prepare``,
    ``prune`` and ``evaluate`` write no log, so the span starts at the first training stage that ran.

    The validate stage rewrites ``data/params.valid`` first in every DVC invocation (``always_changed``), so a
    log older than that file is from an earlier invocation however short the gap: without this, an experiment
    started within ``STAGE_GAP_S`` of the run that trained its teacher (a small model on a fast machine)
    logged that teacher's time as its own."""
    mtimes = [p.stat().st_mtime for p in result_files if p.exists()]
    if not mtimes:
        now = time.time()
        return int(now * 1000), int(now * 1000), "now"
    oldest, end = min(mtimes), max(mtimes)
    spans = []
    for log in sorted((workdir / "logs").glob("*.json")):
        try:
            wall = json.loads(log.read_text()).get("wall_seconds")
        except (OSError, ValueError, AttributeError):
            continue
        if _is_number(wall) and math.isfinite(wall) and wall >= 0:
            spans.append((log.stat().st_mtime, float(wall)))
    if not spans:
        return int(oldest * 1000), int(end * 1000), "result file mtimes"
    marker = workdir / VALIDATED
    floor = marker.stat().st_mtime if marker.exists() else -math.inf  # this invocation's first stage wrote it
    spans = sorted((s for s in spans if s[0] >= floor), reverse=True)  # newest first, this invocation's only
    if not spans:  # no training stage ran in this invocation: it began when validate ran
        return int(floor * 1000), int(max(end, floor) * 1000), "data/params.valid mtime"
    start = spans[0][0] - spans[0][1]
    end = max(end, spans[0][0])
    for mtime, wall in spans[1:]:
        if start - mtime > STAGE_GAP_S:
            break
        start = min(start, mtime - wall)
    start = max(start, floor) if math.isfinite(floor) else start
    return int(start * 1000), int(max(end, start) * 1000), "logs/*.json wall_seconds and file mtimes"


def dataset_input(workdir: Path, params: dict[str, Any]):
    """The dataset as an MLflow run input: name, digest (DVC's md5 of the prepared file when dvc.lock
    has it, else a hash of the data params) and the split sizes where the prepared file tells them."""
    from mlflow.entities import Dataset, DatasetInput, InputTag  # heavy optional dependency: only when logging
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # heavy optional dependency: only when logging

    data_params = {k: v for k, v in params.items() if k.startswith("data.")}
    prepared = workdir / "data" / "prepared" / "dataset.pt"
    digest = hashlib.sha256(json.dumps(data_params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    lock = workdir / "dvc.lock"
    if lock.exists():
        try:
            outs = yaml.safe_load(lock.read_text())["stages"]["prepare"]["outs"]
            digest = next(o["md5"] for o in outs if o.get("path") == "data/prepared/dataset.pt")[:16]
        except (KeyError, TypeError, StopIteration, yaml.YAMLError):
            pass
    profile: dict[str, Any] = {k.removeprefix("data."): v for k, v in data_params.items()
                               if k in ("data.train_subset", "data.test_subset", "data.crop_padding")}
    if prepared.exists():
        try:
            import torch  # heavy optional dependency: only when logging

            d = torch.load(prepared, map_location="cpu", weights_only=True, mmap=True)  # sizes only: no data read
            profile.update(train_size=int(d["train_y"].shape[0]), test_size=int(d["test_y"].shape[0]),
                           input_shape=list(d["train_x"].shape[1:]), num_classes=len(d["classes"]))
        except Exception:  # noqa: BLE001 - sizes are a nicety; the digest already identifies the data
            pass
    name = str(params.get("data.name", "dataset"))
    ds = Dataset(name=name, digest=digest, source_type="local",
                 source=json.dumps({"uri": "data/prepared/dataset.pt", "dvc_stage": "prepare"}),
                 profile=json.dumps(profile, sort_keys=True))
    return DatasetInput(ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "train")])


def check_lock_params(workdir: Path, params: dict[str, Any]) -> None:
    """Refuse to log ``params`` (params.yaml, flat, as DVC reads it) unless every stage in dvc.lock ran with them.

    DVC writes each stage's entry in dvc.lock, with the values of the params keys it lists, as soon as the stage
    has run or been restored from the run-cache, and ``validate`` lists every key. So a params.yaml that changed
    after a stage had read it (another ``dvc exp run`` in the workspace, a hand edit before a relog) differs from
    some entry: the result on disk is not of the params that would be logged (:class:`TrackingUserError`)."""
    lock = workdir / "dvc.lock"
    if not lock.is_file():
        return
    try:
        stages = safe_load_yaml(lock.read_text()).get("stages") or {}
        # an entry of a stage that dvc.yaml no longer has is history, not part of this result
        dvc_yaml = workdir / "dvc.yaml"
        current = set(yaml.safe_load(dvc_yaml.read_text())["stages"]) if dvc_yaml.is_file() else set(stages)
    except (OSError, yaml.YAMLError, AttributeError, UnicodeDecodeError, KeyError, TypeError):
        raise TrackingUserError(f"{lock}: unreadable (or dvc.yaml is); nothing logged (run `dvc repro`)") from None
    for stage, entry in stages.items():
        if stage not in current:
            continue
        recorded = (entry.get("params") or {}).get("params.yaml") if isinstance(entry, dict) else None
        if not isinstance(recorded, dict):
            continue
        for key, value in flatten(recorded).items():
            if key not in params or params[key] != value:
                now = repr(params[key])[:80] if key in params else "absent"
                raise TrackingUserError(
                    f"{workdir / 'params.yaml'}: {key} is {now}, but stage '{stage}' ran with {repr(value)[:80]} "
                    f"(dvc.lock): the results on disk are not of these params, so nothing is logged. Restore the "
                    "params the pipeline ran with, or run `dvc repro` (one experiment at a time in a workspace)")


def collect(workdir: Path) -> dict[str, Any]:
    """Everything one run logs, read from the pipeline's files in ``workdir``."""
    params_path = workdir / "params.yaml"
    evaluate_path = workdir / "metrics" / "evaluate.json"
    for p in (params_path, evaluate_path):
        if not p.exists():
            raise TrackingUserError(f"{p}: not found; nothing logged (run `dvc repro` first)")
    text = params_path.read_text()
    params = flatten(yaml.safe_load(text))
    check_lock_params(workdir, flatten(safe_load_yaml(text)))
    variants = [str(v) for v in (params.get("distill.variants") or [])]
    result = result_metrics(workdir, variants)
    metric_files = [f for f in result_files(workdir) if f.exists()]
    metrics = dict(result)
    # timings: logged, but not part of the fingerprint (logs/latency.json; metrics/latency.json before)
    for latency_json in (workdir / "metrics" / "latency.json", workdir / "logs" / "latency.json"):
        if latency_json.exists():
            metrics.update({k: float(v) for k, v in _read_json(latency_json).items() if _is_number(v)})
    # stage timings and precision, when this workspace ran the stage. A stage that DVC did not rerun for this
    # result (its output unchanged or restored from the run-cache) left an older log: its time is the cached
    # model's, logged as cached_<stage>_<k> so it is never read as this run's cost (pipeline_times says which ran)
    started_ms = pipeline_times(workdir, metric_files)[0]
    for log in sorted((workdir / "logs").glob("*.json")):
        rec = _read_json(log)
        prefix = "" if log.stat().st_mtime * 1000 >= started_ms - 1000 else "cached_"
        for k in ("train_seconds", "wall_seconds", "bf16"):  # bf16: 1 trained under bf16 autocast, 0 in fp32
            if _is_number(rec.get(k)):
                metrics[f"{prefix}{log.stem}_{k}"] = float(rec[k])
    metrics = {k: v for k, v in headline(metrics).items() if math.isfinite(v)}
    # only the pipeline's own files: a sweep report next to them is not part of this run
    curve_files = {"teacher": workdir / "plots" / "teacher.csv",
                   **{p.stem: p for p in sorted((workdir / "plots" / "distill").glob("*.csv"))}}
    curves = {name: read_curve(p) for name, p in curve_files.items() if p.exists()}
    export = workdir / "models" / "export"
    logs = workdir / "logs"  # the deployment table (evaluate): latencies, so not a DVC output
    artifacts = [p for p in [params_path, *metric_files, workdir / "metrics" / "latency.json", logs / "latency.json",
                             logs / "deployment.md", logs / "deployment.csv", *curve_files.values(),
                             workdir / "plots" / "accuracy.png", *(export / f"{v}.kdc" for v in variants)]
                 if p.is_file()]
    models = {v: {"onnx": export / f"{v}.onnx", "pt": workdir / "models" / "students" / f"{v}.pt"} for v in variants}
    # the INT8 file of each student (quantize.method ptq | qat), logged beside its fp32 model as <variant>_int8
    models.update({f"{v}_int8": {"onnx": export / f"{v}.int8.onnx"} for v in variants})  # no torch fallback
    models = {v: m for v, m in models.items() if m["onnx"].is_file() or ("pt" in m and m["pt"].is_file())}
    fingerprint = hashlib.sha256(json.dumps({"params": params, "metrics": result},
                                            sort_keys=True, default=str).encode()).hexdigest()[:16]
    start_ms, end_ms, times_from = pipeline_times(workdir, metric_files)
    return {"params": params, "metrics": metrics, "curves": curves, "artifacts": artifacts, "models": models,
            "fingerprint": fingerprint, "start_ms": start_ms, "end_ms": end_ms, "times_from": times_from,
            "reached": reached(workdir)}


REACHED = ("channel_ratio", "reached_macs_reduction")  # metrics/prune.json, channel pruning: what was reached


def reached(workdir: Path) -> dict[str, float]:
    """What channel pruning reached (metrics/prune.json), for the run's name; not logged as metrics."""
    path = workdir / "metrics" / "prune.json"
    rec = _read_json(path) if path.is_file() else {}
    return {k: float(rec[k]) for k in REACHED if _is_number(rec.get(k)) and math.isfinite(rec[k])}


def run_name(params: dict[str, Any], exp_name: str | None, reached: dict[str, float] | None = None) -> str:
    """What differs first: method, ratio, variants, seed, dataset, then the DVC experiment name. With
    ``prune.target_macs_reduction`` (channel pruning), prune.ratio is not used: the ratio shown is the channel
    ratio ``reached`` (metrics/prune.json), followed by the MAC target, e.g. ``channel-0.304-macs/2-...``."""
    variants = params.get("distill.variants") or []
    variants = "+".join(str(v) for v in variants) if isinstance(variants, (list, tuple)) else str(variants)
    ratio: Any = params.get("prune.ratio")
    target = params.get("prune.target_macs_reduction")
    if target is not None:
        got = (reached or {}).get("channel_ratio")
        ratio = "-".join(([f"{got:.3g}"] if got is not None else []) + [f"macs/{target:g}"])
    parts = [params.get("prune.method"), ratio, variants, f"s{params.get('seed')}",
             params.get("data.name"), exp_name]
    return "-".join(str(p) for p in parts if p not in (None, ""))
