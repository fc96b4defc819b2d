"""MLflow tracking: one FINISHED run per pipeline result, logged from files, never duplicated.

Where runs go, in order of precedence:
  1. ``MLFLOW_TRACKING_URI`` when the user set it (a team's shared server);
  2. ``sqlite:///<repo root>/mlflow.db``, where the repo root is ``DVC_ROOT`` when DVC runs us
     (so queued and ``--temp`` experiments log into the main repo, not a temp copy), else the
     current directory.
Artifacts go to ``<repo root>/mlartifacts`` (an absolute location fixed at experiment creation).
The experiment is tagged ``mlflow.experimentKind = custom_model_development`` so that MLflow 3's UI
opens it on the runs table, not on the GenAI traces view.

Logging reads the files the stages wrote (params.yaml, metrics/, plots/, logs/, models/export/). It
runs as its own DVC stage with no outputs, so DVC's run-cache never skips it, and it is keyed by a
fingerprint of params + metrics: a result that is already in MLflow is not logged twice.

What one run holds: every params.yaml key as a dotted param; the headline metrics rounded for reading
(accuracies to 0.01 pt, ratios to 3 significant digits; the committed JSON files, also logged as
artifacts, keep full precision); the per-epoch curves; the students as MLflow models (ONNX flavour
from models/export/<variant>.onnx, else PyTorch); the compact ``.kdc`` exports; the dataset as a run
input; git source tags; and the pipeline's real start and end time (see ``pipeline_times``).

A run left RUNNING by a killed ``track`` is completed by the next ``track`` (same fingerprint), so
each result ends as exactly one FINISHED run. ``python -m kdprune.tracking relog`` pushes the
current files again after a failure, and restores the artifacts and models of an existing run
that are missing from the artifact store (e.g. after ``mlartifacts/`` was deleted).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

from kdprune import metrics as metrics_files
from kdprune.params import flatten

T = TypeVar("T")
FINGERPRINT_TAG = "kdprune.fingerprint"
ALIASES_TAG = "dvc_exp_aliases"  # other DVC experiments that reproduced the same result
KIND_TAG = "kdprune.kind"  # "pipeline" for one pipeline result, "report" for a sweep summary
TIMES_TAG = "kdprune.times_from"  # where the run's start/end times came from
# MLflow 3's UI opens an experiment on the GenAI traces view unless this tag says otherwise
# (values from the UI bundle of mlflow 3.17.2: "custom_model_development" | "genai_development")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RATIO_METRICS = ("compression_ratio", "prunable_compression_ratio", "mac_reduction")
MODEL_PREFIX = "student-"  # logged model name: student-<variant>


class TrackingError(RuntimeError):
    """The tracking store could not be reached or written; the result files are intact (track exits 3)."""


class TrackingUserError(TrackingError):
    """A problem the user must fix first: a result that is not finite, a read-only store (exit 2)."""


def repo_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{repo_root(env) / 'mlflow.db'}"


def is_server_uri(uri: str) -> bool:
    """A tracking server (``http(s)://host:port``), not a store on this machine's disk."""
    return uri.lower().startswith(("http://", "https://"))


def artifact_location(env: Mapping[str, str] | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: ``<repo root>/mlartifacts`` for a local store. None for a
    tracking server: the server picks (``mlflow-artifacts:/`` under ``--serve-artifacts``, so every client
    uploads over HTTP, with no shared filesystem), not a path on whichever client created the experiment."""
    if is_server_uri(tracking_uri(env)):
        return None
    return (repo_root(env) / "mlartifacts").as_uri()


def retry(fn: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Retry on SQLite lock contention (parallel queued experiments) with jittered backoff."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            locked = "database is locked" in str(e) or "database table is locked" in str(e)
            if not locked or i == attempts - 1:
                raise
            print(f"mlflow: store locked during '{what}' (attempt {i + 1}/{attempts}); retrying", file=sys.stderr)
            time.sleep(min(8.0, 0.25 * 2 ** i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


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
    from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL,
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


STAGE_GAP_S = 120.0  # a stage log that ended this long before the next stage began is from an earlier invocation


def pipeline_times(workdir: Path, result_files: list[Path]) -> tuple[int, int, str]:
    """(start, end) of the pipeline invocation that wrote ``result_files``, in ms since the epoch, and how.

    end: the newest modification time of the result files and of the stage timing logs.
    start: from ``logs/*.json`` (each training stage's ``wall_seconds``, ending at the log's mtime),
    walking back from the newest: a stage is part of this invocation while it ended at most
    ``STAGE_GAP_S`` before the next one began; an earlier log belongs to a stage DVC did not rerun
    (unchanged or restored from its cache). Without logs: the oldest result file's mtime. ``prepare``,
    ``prune`` and ``evaluate`` write no log, so the span starts at the first training stage that ran."""
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
    spans.sort(reverse=True)  # newest first
    start = spans[0][0] - spans[0][1]
    end = max(end, spans[0][0])
    for mtime, wall in spans[1:]:
        if start - mtime > STAGE_GAP_S:
            break
        start = min(start, mtime - wall)
    return int(start * 1000), int(max(end, start) * 1000), "logs/*.json wall_seconds and file mtimes"


def dataset_input(workdir: Path, params: dict[str, Any]):
    """The dataset as an MLflow run input: name, digest (DVC's md5 of the prepared file when dvc.lock
    has it, else a hash of the data params) and the split sizes where the prepared file tells them."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

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
            import torch

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


def collect(workdir: Path) -> dict[str, Any]:
    """Everything one run logs, read from the pipeline's files in ``workdir``."""
    params_path = workdir / "params.yaml"
    evaluate_path = workdir / "metrics" / "evaluate.json"
    for p in (params_path, evaluate_path):
        if not p.exists():
            raise TrackingUserError(f"{p}: not found; nothing logged (run `dvc repro` first)")
    params = flatten(yaml.safe_load(params_path.read_text()))
    variants = [str(v) for v in (params.get("distill.variants") or [])]
    result = result_metrics(workdir, variants)
    metric_files = [f for f in result_files(workdir) if f.exists()]
    metrics = dict(result)
    # timings: logged, but not part of the fingerprint (logs/latency.json; metrics/latency.json before)
    for latency_json in (workdir / "metrics" / "latency.json", workdir / "logs" / "latency.json"):
        if latency_json.exists():
            metrics.update({k: float(v) for k, v in _read_json(latency_json).items() if _is_number(v)})
    # stage timings, when this workspace ran the stage. A stage that DVC did not rerun for this result (its
    # output unchanged or restored from the run-cache) left an older log: its time is the cached model's,
    # logged as cached_<stage>_<k> so it is never read as this run's cost (pipeline_times says which ran)
    started_ms = pipeline_times(workdir, metric_files)[0]
    for log in sorted((workdir / "logs").glob("*.json")):
        rec = _read_json(log)
        prefix = "" if log.stat().st_mtime * 1000 >= started_ms - 1000 else "cached_"
        for k in ("train_seconds", "wall_seconds"):
            if _is_number(rec.get(k)):
                metrics[f"{prefix}{log.stem}_{k}"] = float(rec[k])
    metrics = {k: v for k, v in headline(metrics).items() if math.isfinite(v)}
    # only the pipeline's own files: a sweep report next to them is not part of this run
    curve_files = {"teacher": workdir / "plots" / "teacher.csv",
                   **{p.stem: p for p in sorted((workdir / "plots" / "distill").glob("*.csv"))}}
    curves = {name: read_curve(p) for name, p in curve_files.items() if p.exists()}
    export = workdir / "models" / "export"
    artifacts = [p for p in [params_path, *metric_files, workdir / "metrics" / "latency.json", *curve_files.values(),
                             workdir / "plots" / "accuracy.png", *(export / f"{v}.kdc" for v in variants)]
                 if p.is_file()]
    models = {v: {"onnx": export / f"{v}.onnx", "pt": workdir / "models" / "students" / f"{v}.pt"} for v in variants}
    models = {v: m for v, m in models.items() if m["onnx"].is_file() or m["pt"].is_file()}
    fingerprint = hashlib.sha256(json.dumps({"params": params, "metrics": result},
                                            sort_keys=True, default=str).encode()).hexdigest()[:16]
    start_ms, end_ms, times_from = pipeline_times(workdir, metric_files)
    return {"params": params, "metrics": metrics, "curves": curves, "artifacts": artifacts, "models": models,
            "fingerprint": fingerprint, "start_ms": start_ms, "end_ms": end_ms, "times_from": times_from}


def run_name(params: dict[str, Any], exp_name: str | None) -> str:
    """What differs first: method, ratio, variants, seed, dataset, then the DVC experiment name."""
    variants = params.get("distill.variants") or []
    variants = "+".join(str(v) for v in variants) if isinstance(variants, (list, tuple)) else str(variants)
    parts = [params.get("prune.method"), params.get("prune.ratio"), variants, f"s{params.get('seed')}",
             params.get("data.name"), exp_name]
    return "-".join(str(p) for p in parts if p not in (None, ""))


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def _read_only(where: str | os.PathLike) -> str:
    return (f"{where}: read-only (no write permission), so MLflow cannot log to it; make it writable "
            "(e.g. chmod u+w on it and its directory) or set MLFLOW_TRACKING_URI to a writable store. "
            "Nothing was logged; the results stay in metrics/ and plots/")


def check_writable(uri: str) -> None:
    """A local SQLite store must be writable, file and directory (SQLite writes a journal next to it)."""
    path = _sqlite_path(uri)
    if path is None:
        return
    if path.exists() and not os.access(path, os.W_OK):
        raise TrackingUserError(_read_only(path))
    if path.parent.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise TrackingUserError(_read_only(f"{path.parent} (the directory of {path.name})"))


# how mlflow 3.17.2 reports a server's refusal (rest_utils: a plain-text 401/403 answer, or the JSON error codes)
AUTH_REFUSED = ("error code 401", "error code 403", "UNAUTHENTICATED", "PERMISSION_DENIED")


def store_error(uri: str, e: Exception) -> TrackingError:
    """The one-line error for a failure to talk to the store: read-only store or artifact folder, a server that
    refuses our credentials (both :class:`TrackingUserError`), or unreachable."""
    if isinstance(e, TrackingError):
        return e
    if isinstance(e, PermissionError):  # e.g. mlartifacts/ not writable
        return TrackingUserError(_read_only(e.filename or uri))
    if "readonly database" in str(e):  # SQLite: "attempt to write a readonly database"
        return TrackingUserError(_read_only(_sqlite_path(uri) or uri))
    if is_server_uri(uri) and any(m in str(e) for m in AUTH_REFUSED):
        status = "401" if "401" in str(e) or "UNAUTHENTICATED" in str(e) else "403"
        return TrackingUserError(
            f"the MLflow server at {uri} refused the request (HTTP {status}: "
            f"{'no or wrong credentials' if status == '401' else 'this user may not write to the experiment'}); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a user of its basic-auth app with EDIT "
            "permission), or MLFLOW_TRACKING_TOKEN for a server behind a token-checking proxy, then log the "
            "results with `python -m kdprune.tracking relog`; the results stay in metrics/ and plots/")
    return TrackingError(_unreachable(uri, e))


def ensure_experiment(client, name: str, location: str) -> str:
    """The experiment's id, creating it (with an absolute artifact location) when needed; tags it so that
    MLflow 3's UI opens it on the runs table. Safe against a parallel creation."""
    import mlflow

    exp = retry(lambda: client.get_experiment_by_name(name), "get experiment")
    if exp is None:
        try:
            return retry(lambda: client.create_experiment(name, artifact_location=location,
                                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}),
                         "create experiment")
        except mlflow.exceptions.MlflowException:  # created by a parallel run meanwhile, or a store error
            exp = retry(lambda: client.get_experiment_by_name(name), "get experiment")
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        retry(lambda: client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND),
              "set experiment tag")
    return exp.experiment_id


def finished_pipeline_runs(client, experiment_ids: list[str], extra_filter: str = "") -> list:
    """The FINISHED pipeline runs of these experiments (a run left RUNNING by a kill is not a result)."""
    f = f"tags.`{KIND_TAG}` = 'pipeline' and attributes.status = 'FINISHED'"
    f += f" and {extra_filter}" if extra_filter else ""
    return retry(lambda: client.search_runs(experiment_ids, filter_string=f, max_results=50000), "search runs")


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in retry(lambda: client.list_artifacts(run_id, path), "list artifacts"):
        out |= _artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _artifact_dir(path: Path, workdir: Path) -> str | None:
    sub = str(path.parent.relative_to(workdir))
    return None if sub == "." else sub


def _model_signature(onnx_model):
    """Input/output tensor specs from the ONNX graph (dynamic dims -> -1)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(v):
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in v.type.tensor_type.shape.dim]
        return TensorSpec(np.dtype("float32"), tuple(dims), name=v.name)

    g = onnx_model.graph
    inits = {i.name for i in g.initializer}
    return ModelSignature(inputs=Schema([spec(v) for v in g.input if v.name not in inits]),
                          outputs=Schema([spec(v) for v in g.output]))


def _skip_package_scan() -> None:
    """mlflow's log_model checks the pinned requirements against the environment, and to do so first maps
    every module of every installed distribution to its package (importlib_metadata.packages_distributions:
    ~3-6 s on this machine, more than everything else ``track`` does). The requirements we pass are exact
    pins of packages whose import name is their package name, so the map needs only those. mlflow 3.17.2
    keeps the map in ``requirements_utils._MODULES_TO_PACKAGES`` (None until built); if that changes, the
    full scan simply runs."""
    from mlflow.utils import requirements_utils as ru

    if getattr(ru, "_MODULES_TO_PACKAGES", 0) is None:
        ru._MODULES_TO_PACKAGES = {m: [m] for m in ("mlflow", "onnx", "onnxruntime", "torch", "cloudpickle")}


def log_student(client, exp_id: str, run_id: str, variant: str, files: dict[str, Path]) -> str:
    """Log one student as an MLflow model of this run: ONNX flavour when its export exists (cheap: no
    requirement inference, no input example), else PyTorch (pt2, via torch.export; no pickled module).
    Returns the logged model's id."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    name = f"{MODEL_PREFIX}{variant}"
    flavor = "onnx" if files["onnx"].is_file() else "pytorch"
    _skip_package_scan()
    # created here so that it lands in the run's experiment (mlflow's fluent default is experiment 0)
    model_id = client.create_logged_model(exp_id, name=name, source_run_id=run_id,
                                          tags={"variant": variant, "flavor": flavor}).model_id
    with _use_tracking_uri(client.tracking_uri):
        if flavor == "onnx":
            import mlflow.onnx
            import onnx

            model = onnx.load(str(files["onnx"]))
            info = mlflow.onnx.log_model(model, name=name, run_id=run_id, signature=_model_signature(model),
                                         pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                                         save_as_external_data=False, model_id=model_id)
        else:
            import mlflow.pytorch
            import torch

            from kdprune import io

            module, _, meta = io.load_checkpoint(files["pt"])
            example = torch.zeros(2, *meta["input_shape"]).numpy()  # batch 2: the exported batch dim stays dynamic
            info = mlflow.pytorch.log_model(module.eval(), name=name, run_id=run_id, serialization_format="pt2",
                                            input_example=example,
                                            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                                            model_id=model_id)
    return info.model_id


def _run_models(client, run_id: str) -> dict[str, Any]:
    """This run's logged models that still have their files, by name (a model whose artifacts are gone is
    deleted, so that it is logged again)."""
    run = retry(lambda: client.get_run(run_id), "get run")
    out = {}
    for mo in (run.outputs.model_outputs if run.outputs else []):
        try:
            model = retry(lambda: client.get_logged_model(mo.model_id), "get model")
        except Exception:  # noqa: BLE001 - deleted meanwhile
            continue
        files = {f.path for f in retry(lambda: client.list_logged_model_artifacts(model.model_id), "list model")}
        if "MLmodel" in files:
            out[model.name] = model
        else:
            retry(lambda: client.delete_logged_model(model.model_id), "delete model")
    return out


def complete(client, exp_id: str, run, info: dict[str, Any], workdir: Path) -> list[str]:
    """Bring ``run`` up to what ``info`` says it must hold; log only what is missing (params, metrics of an
    unfinished run, dataset input, artifacts, models). Returns what was added, for the message."""
    from mlflow.entities import Metric, Param

    run_id = run.info.run_id
    added = []
    have = run.data.params
    params = [Param(k, str(v)[:6000]) for k, v in sorted(info["params"].items()) if k not in have]
    for i in range(0, len(params), 100):
        retry(lambda: client.log_batch(run_id, params=params[i:i + 100]), "log params")
    if not (run.inputs and run.inputs.dataset_inputs):
        retry(lambda: client.log_inputs(run_id, datasets=[dataset_input(workdir, info["params"])]), "log input")
        added.append("dataset input")
    present = _artifact_paths(client, run_id)
    for path in info["artifacts"]:
        sub = _artifact_dir(path, workdir)
        if (f"{sub}/{path.name}" if sub else path.name) not in present:
            retry(lambda: client.log_artifact(run_id, str(path), artifact_path=sub), "log artifact")
            added.append(str(path.relative_to(workdir)))
    models = _run_models(client, run_id)
    for variant, files in info["models"].items():
        if f"{MODEL_PREFIX}{variant}" not in models:
            retry(lambda: log_student(client, exp_id, run_id, variant, files), "log model")
            added.append(f"model {MODEL_PREFIX}{variant}")
    # after the models: mlflow would otherwise copy every step-0 metric onto each model as it logs it
    if run.info.status != "FINISHED":  # metrics carry the pipeline's end time: re-logging them is a no-op
        t = info["end_ms"]
        metrics = [Metric(k, v, t, 0) for k, v in sorted(info["metrics"].items())]
        for prefix, rows in info["curves"].items():
            for row in rows:
                step = int(row.get("epoch", 0))
                metrics += [Metric(f"{prefix}_{k}", v, t, step) for k, v in row.items()
                            if k != "epoch" and math.isfinite(v)]  # skip NaN (epochs without evaluation)
        for i in range(0, len(metrics), 500):
            retry(lambda: client.log_batch(run_id, metrics=metrics[i:i + 500]), "log metrics")
    return added


WAIT_ENV = "KDPRUNE_MLFLOW_WAIT_S"  # how long `track` waits for a tracking server that is down
WAIT_DEFAULT_S = 120
WAIT_MAX_S = 86400


def server_wait_seconds(env: Mapping[str, str]) -> float:
    """Seconds to keep retrying a tracking server that does not answer (``KDPRUNE_MLFLOW_WAIT_S``, default 120;
    0 = fail at once)."""
    text = env.get(WAIT_ENV, "").strip()
    if not text:
        return float(WAIT_DEFAULT_S)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= WAIT_MAX_S):
        raise TrackingUserError(f"{WAIT_ENV} = {text!r} is invalid: must be a number of seconds in [0, {WAIT_MAX_S}]")
    return value


def is_outage(e: BaseException) -> bool:
    """The server did not answer (connection refused or reset, timeout, 502/503/504 after mlflow's own retries),
    as opposed to an answer that refuses the request (401, 400, ...), which waiting does not fix."""
    import requests

    seen: BaseException | None = e
    for _ in range(10):  # the exception chain, bounded
        if seen is None:
            break
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                             TimeoutError)):
            return True
        text = str(seen)
        # mlflow.utils.rest_utils wraps every transport failure as "API request to <url> failed with (timeout)
        # exception ..." (3.17.2); an HTTP error answer reads "failed with error code <status>"
        if "failed with exception" in text or "failed with timeout exception" in text:
            return True
        if any(f"error code {code}" in text for code in (502, 503, 504)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def log_pipeline(workdir: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Log the pipeline result in ``workdir`` as one FINISHED MLflow run (or find and complete the
    existing one). Returns its id.

    A tracking server that does not answer (restarted, briefly down) is tried again with backoff for up to
    ``KDPRUNE_MLFLOW_WAIT_S`` seconds (default 120) before :class:`TrackingError`. Each try starts over from
    the fingerprint search, so a try cut off half-way (a run created but not finished, some artifacts
    uploaded) is completed by the next one, never logged twice."""
    env = os.environ if env is None else env
    workdir = Path(workdir or os.getcwd()).resolve()
    info = collect(workdir)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    uri = tracking_uri(env)
    wait = server_wait_seconds(env) if is_server_uri(uri) else 0.0
    deadline, delay = time.monotonic() + wait, 2.0
    while True:
        try:
            return _log_once(workdir, env, info, uri)
        except Exception as e:  # noqa: BLE001 - unreachable server, bad URI, broken or read-only store
            left = deadline - time.monotonic()
            if isinstance(e, TrackingError) or not is_outage(e) or left <= 0:
                raise store_error(uri, e) from None
            delay = min(delay, left)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            print(f"mlflow: {uri} did not answer ({first}); trying again in {delay:.0f} s "
                  f"(for {left:.0f} s more; {WAIT_ENV} sets how long)", file=sys.stderr, flush=True)
            time.sleep(delay)
            delay = min(30.0, delay * 2)


def _log_once(workdir: Path, env: Mapping[str, str], info: dict[str, Any], uri: str) -> str:
    """One try of :func:`log_pipeline`; raises the store's own exception on failure."""
    from mlflow.tracking import MlflowClient

    exp_name = str(info["params"].get("mlflow.experiment", "kdprune"))
    fp = info["fingerprint"]
    name = env.get("DVC_EXP_NAME")
    check_writable(uri)
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(client, exp_name, artifact_location(env))
    same = retry(lambda: client.search_runs([exp_id], filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fp}'",
                                            max_results=1000, order_by=["attributes.start_time ASC"]),
                 "search runs")
    finished = [r for r in same if r.info.status == "FINISHED"]
    running = [r for r in same if r.info.status == "RUNNING"]
    if finished:  # a RUNNING twin was left by a kill: it is not a second result
        run, stale = finished[0], running
    elif running:  # a kill interrupted the logging of this very result: complete that run
        run, stale = running[-1], running[:-1]
    else:
        run, stale = None, []
    for r in stale:
        retry(lambda: client.set_terminated(r.info.run_id, "KILLED"), "mark stale run")
        print(f"mlflow: run {r.info.run_id} was left RUNNING by an interrupted `track`; marked KILLED")
    if run is not None and run.info.status == "FINISHED":
        run_id = run.info.run_id
        aliases = [a for a in run.data.tags.get(ALIASES_TAG, "").split(",") if a]
        if name and name != run.data.tags.get("dvc_exp_name") and name not in aliases:
            # another DVC experiment reproduced this exact result: remember its name on the run
            retry(lambda: client.set_tag(run_id, ALIASES_TAG, ",".join(aliases + [name])), "set tag")
        added = complete(client, exp_id, run, info, workdir)
        restored = f"; restored what was missing: {', '.join(added)}" if added else ""
        print(f"mlflow: this result is already logged as run {run_id} ({uri}); not logging a duplicate{restored}")
        return run_id
    if run is None:
        tags = {
            FINGERPRINT_TAG: fp,
            KIND_TAG: "pipeline",
            TIMES_TAG: info["times_from"],
            "git_commit": git_commit(workdir),
            "dvc_exp_name": name or "",
            "dvc_baseline_rev": env.get("DVC_EXP_BASELINE_REV", ""),
            "prune.method": str(info["params"].get("prune.method")),
            "data.name": str(info["params"].get("data.name")),
            **source_tags(workdir, repo_root(env)),
        }
        run = retry(lambda: client.create_run(exp_id, start_time=info["start_ms"], tags=tags,
                                              run_name=run_name(info["params"], name)), "create run")
        what = "logged run"
    else:
        what = "completed the interrupted run"
    run_id = run.info.run_id
    complete(client, exp_id, run, info, workdir)
    # two processes may have logged twins of one result at once: the older FINISHED one wins
    twins = finished_pipeline_runs(client, [exp_id], f"tags.`{FINGERPRINT_TAG}` = '{fp}'")
    if twins:
        keep = min(twins, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
        retry(lambda: client.set_terminated(run_id, "KILLED", end_time=info["end_ms"]), "finish run")
        print(f"mlflow: this result was logged meanwhile as run {keep}; run {run_id} marked KILLED")
        return keep
    retry(lambda: client.set_terminated(run_id, "FINISHED", end_time=info["end_ms"]), "finish run")
    print(f"mlflow: {what} {run_id} '{run_name(info['params'], name)}' to {uri} (experiment '{exp_name}')")
    return run_id


def _unreachable(uri: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return (f"could not log to MLflow at {uri}: {first}. Nothing is lost: the results stay in metrics/ and plots/. "
            "Once the tracking store is reachable, log them with `python -m kdprune.tracking relog` "
            "(or `dvc repro track`).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.tracking", description="MLflow logging for kdprune.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("relog", help="log the current metrics/ and plots/ to MLflow; for a result already logged, "
                                 "restore its missing artifacts and models")
    sub.add_parser("uri", help="print the tracking URI that would be used")
    args = ap.parse_args(argv)
    if args.cmd == "uri":
        print(tracking_uri())
        return 0
    try:
        log_pipeline()
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
