"""Log one pipeline result to MLflow as exactly one FINISHED run, never duplicated (keyed by its fingerprint),
completing a run that a killed ``track`` left RUNNING and restoring what an existing run lacks.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from kdprune import checkpoint
from kdprune.tracking.result import collect, dataset_input, git_commit, run_name, source_tags
from kdprune.tracking.store import (ALIASES_TAG, FINGERPRINT_TAG, KIND_TAG, TIMES_TAG, WAIT_ENV, TrackingError,
                                    artifact_location, check_sqlite_file, check_writable, ensure_experiment,
                                    finished_pipeline_runs, first_line, is_outage, is_server_uri, quiet_links, redact,
                                    repo_root, retry, server_wait_seconds, store_error, tracking_uri)

MODEL_PREFIX = "student-"  # logged model name: student-<variant>


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
    import numpy as np  # heavy optional dependency: only when logging
    from mlflow.models import ModelSignature  # heavy optional dependency: only when logging
    from mlflow.types.schema import Schema, TensorSpec  # heavy optional dependency: only when logging

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
    from mlflow.utils import requirements_utils as ru  # heavy optional dependency: only when logging

    if getattr(ru, "_MODULES_TO_PACKAGES", 0) is None:
        ru._MODULES_TO_PACKAGES = {m: [m] for m in ("mlflow", "onnx", "onnxruntime", "torch", "cloudpickle")}


def log_student(client, exp_id: str, run_id: str, variant: str, files: dict[str, Path]) -> str:
    """Log one student as an MLflow model of this run: ONNX flavour when its export exists (cheap: no
    requirement inference, no input example), else PyTorch (pt2, via torch.export; no pickled module).
    Returns the logged model's id."""
    import mlflow  # heavy optional dependency: only when logging
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # heavy optional dependency

    name = f"{MODEL_PREFIX}{variant}"
    flavor = "onnx" if files["onnx"].is_file() else "pytorch"
    _skip_package_scan()
    # created here so that it lands in the run's experiment (mlflow's fluent default is experiment 0)
    model_id = client.create_logged_model(exp_id, name=name, source_run_id=run_id,
                                          tags={"variant": variant, "flavor": flavor}).model_id
    with _use_tracking_uri(client.tracking_uri):
        if flavor == "onnx":
            import mlflow.onnx  # heavy optional dependency: only when logging
            import onnx  # heavy optional dependency: only when logging

            model = onnx.load(str(files["onnx"]))
            info = mlflow.onnx.log_model(model, name=name, run_id=run_id, signature=_model_signature(model),
                                         pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                                         save_as_external_data=False, model_id=model_id)
        else:
            import mlflow.pytorch  # heavy optional dependency: only when logging
            import torch  # heavy optional dependency: only when logging

            module, _, meta = checkpoint.load_checkpoint(files["pt"])
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
    from mlflow.entities import Metric, Param  # heavy optional dependency: only when logging

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
            first = first_line(e, 200)
            print(f"mlflow: {redact(uri)} did not answer ({first}); trying again in {delay:.0f} s "
                  f"(for {left:.0f} s more; {WAIT_ENV} sets how long)", file=sys.stderr, flush=True)
            time.sleep(delay)
            delay = min(30.0, delay * 2)


def _log_once(workdir: Path, env: Mapping[str, str], info: dict[str, Any], uri: str) -> str:
    """One try of :func:`log_pipeline`; raises the store's own exception on failure."""
    from mlflow.tracking import MlflowClient  # heavy optional dependency: only when logging

    exp_name = str(info["params"].get("mlflow.experiment", "kdprune"))
    fp = info["fingerprint"]
    name = env.get("DVC_EXP_NAME")
    check_writable(uri)
    check_sqlite_file(uri)
    quiet_links(uri)
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
        print(f"mlflow: this result is already logged as run {run_id} ({redact(uri)}); not logging a duplicate{restored}")
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
                                              run_name=run_name(info["params"], name, info.get("reached"))), "create run")
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
    print(f"mlflow: {what} {run_id} '{run_name(info['params'], name, info.get('reached'))}' to {redact(uri)} (experiment '{exp_name}')")
    return run_id
