"""MLflow tracking: one run per pipeline result, logged from files, never duplicated.

Where runs go, in order of precedence:
  1. ``MLFLOW_TRACKING_URI`` when the user set it (a team's shared server);
  2. ``sqlite:///<repo root>/mlflow.db``, where the repo root is ``DVC_ROOT`` when DVC runs us
     (so queued and ``--temp`` experiments log into the main repo, not a temp copy), else the
     current directory.
Artifacts go to ``<repo root>/mlartifacts`` (an absolute location fixed at experiment creation).

Logging reads the files the stages wrote (params.yaml, metrics/, plots/, logs/). It runs as its
own DVC stage with no outputs, so DVC's run-cache never skips it, and it is keyed by a
fingerprint of params + metrics: a result that is already in MLflow is not logged twice.
``python -m kdprune.tracking relog`` pushes the current files again after a failure.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

from kdprune.params import flatten

T = TypeVar("T")
FINGERPRINT_TAG = "kdprune.fingerprint"
ALIASES_TAG = "dvc_exp_aliases"  # other DVC experiments that reproduced the same result
KIND_TAG = "kdprune.kind"  # "pipeline" for one pipeline result, "report" for a sweep summary


class TrackingError(RuntimeError):
    pass


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


def git_commit(cwd: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_curve(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def collect(workdir: Path) -> dict[str, Any]:
    """Everything one run logs, read from the pipeline's files in ``workdir``."""
    params_path = workdir / "params.yaml"
    evaluate_path = workdir / "metrics" / "evaluate.json"
    for p in (params_path, evaluate_path):
        if not p.exists():
            raise TrackingError(f"{p}: not found; run `dvc repro` first")
    params = flatten(yaml.safe_load(params_path.read_text()))
    evaluate = json.loads(evaluate_path.read_text())
    metrics = {k: float(v) for k, v in evaluate.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    prune_json = workdir / "metrics" / "prune.json"
    prune = json.loads(prune_json.read_text()) if prune_json.exists() else {}
    metrics.update({k: float(prune[k]) for k in ("sparsity", "prunable_sparsity") if prune.get(k) is not None})
    latency_json = workdir / "logs" / "latency.json"  # timings: logged, but not part of the fingerprint
    if latency_json.exists():
        latency = json.loads(latency_json.read_text())
        metrics.update({k: float(v) for k, v in latency.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for log in sorted((workdir / "logs").glob("*.json")):  # timings, when this workspace ran the stage
        rec = json.loads(log.read_text())
        for k in ("train_seconds", "wall_seconds"):
            if k in rec:
                metrics[f"{log.stem}_{k}"] = float(rec[k])
    # only the pipeline's own files: a sweep report next to them is not part of this run
    curve_files = {"teacher": workdir / "plots" / "teacher.csv",
                   **{p.stem: p for p in sorted((workdir / "plots" / "distill").glob("*.csv"))}}
    curves = {name: read_curve(p) for name, p in curve_files.items() if p.exists()}
    metric_files = [workdir / "metrics" / f"{n}.json" for n in ("teacher", "prune", "evaluate")]
    metric_files += sorted((workdir / "metrics" / "distill").glob("*.json"))
    artifacts = [p for p in [params_path, *metric_files, *curve_files.values(), workdir / "plots" / "accuracy.png"]
                 if p.is_file()]
    fingerprint = hashlib.sha256(json.dumps({"params": params, "metrics": evaluate},
                                            sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"params": params, "metrics": metrics, "curves": curves, "artifacts": artifacts,
            "fingerprint": fingerprint}


def run_name(params: dict[str, Any], exp_name: str | None) -> str:
    name = (f"ratio={params.get('prune.ratio')} seed={params.get('seed')} {params.get('prune.method')} "
            f"{params.get('data.name')}")
    return f"{exp_name} {name}" if exp_name else name


def log_pipeline(workdir: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Log the pipeline result in ``workdir`` as one MLflow run (or find the existing one). Returns its id."""
    env = os.environ if env is None else env
    workdir = Path(workdir or os.getcwd()).resolve()
    info = collect(workdir)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(env)
    exp_name = str(info["params"].get("mlflow.experiment", "kdprune"))
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = retry(lambda: client.get_experiment_by_name(exp_name), "get experiment")
        if exp is None:
            try:
                exp_id = retry(lambda: client.create_experiment(exp_name, artifact_location=artifact_location(env)),
                               "create experiment")
            except mlflow.exceptions.MlflowException:  # created by a parallel run meanwhile
                exp_id = retry(lambda: client.get_experiment_by_name(exp_name), "get experiment").experiment_id
        else:
            exp_id = exp.experiment_id
        existing = retry(lambda: client.search_runs(
            [exp_id], filter_string=f"tags.`{FINGERPRINT_TAG}` = '{info['fingerprint']}' and attributes.status = 'FINISHED'",
            max_results=1), "search runs")
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI, broken store
        raise TrackingError(_unreachable(uri, e)) from None
    if existing:
        run_id = existing[0].info.run_id
        name = env.get("DVC_EXP_NAME")
        aliases = [a for a in existing[0].data.tags.get(ALIASES_TAG, "").split(",") if a]
        if name and name != existing[0].data.tags.get("dvc_exp_name") and name not in aliases:
            # another DVC experiment reproduced this exact result: remember its name on the run
            retry(lambda: client.set_tag(run_id, ALIASES_TAG, ",".join(aliases + [name])), "set tag")
        print(f"mlflow: this result is already logged as run {run_id} ({uri}); not logging a duplicate")
        return run_id

    exp_name_dvc = env.get("DVC_EXP_NAME")
    tags = {
        FINGERPRINT_TAG: info["fingerprint"],
        KIND_TAG: "pipeline",
        "git_commit": git_commit(workdir),
        "dvc_exp_name": exp_name_dvc or "",
        "dvc_baseline_rev": env.get("DVC_EXP_BASELINE_REV", ""),
        "prune.method": str(info["params"].get("prune.method")),
        "data.name": str(info["params"].get("data.name")),
    }
    try:
        run = retry(lambda: client.create_run(exp_id, run_name=run_name(info["params"], exp_name_dvc),
                                              tags=tags), "create run")
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        params = [Param(k, str(v)[:6000]) for k, v in sorted(info["params"].items())]
        metrics = [Metric(k, v, now, 0) for k, v in sorted(info["metrics"].items())]
        for prefix, rows in info["curves"].items():
            for row in rows:
                step = int(row.get("epoch", 0))
                metrics += [Metric(f"{prefix}_{k}", v, now, step) for k, v in row.items()
                            if k != "epoch" and v == v]  # skip NaN (epochs without evaluation)
        for i in range(0, len(params), 100):
            retry(lambda: client.log_batch(run_id, params=params[i:i + 100]), "log params")
        for i in range(0, len(metrics), 500):
            retry(lambda: client.log_batch(run_id, metrics=metrics[i:i + 500]), "log metrics")
        for path in info["artifacts"]:
            sub = str(path.parent.relative_to(workdir))
            retry(lambda: client.log_artifact(run_id, str(path), artifact_path=None if sub == "." else sub),
                  "log artifact")
        retry(lambda: client.set_terminated(run_id, "FINISHED"), "finish run")
    except Exception as e:  # noqa: BLE001
        raise TrackingError(_unreachable(uri, e)) from None
    print(f"mlflow: logged run {run_id} '{run_name(info['params'], exp_name_dvc)}' to {uri} "
          f"(experiment '{exp_name}')")
    return run_id


def _unreachable(uri: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return (f"could not log to MLflow at {uri}: {first}. Nothing is lost: the results stay in metrics/ and plots/. "
            "Once the tracking store is reachable, log them with `python -m kdprune.tracking relog` "
            "(or `dvc repro track`).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.tracking", description="MLflow logging for kdprune.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("relog", help="log the current metrics/ and plots/ to MLflow (skipped if already logged)")
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
