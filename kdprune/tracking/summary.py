"""A summary run: a report's files (report, frontier, study) logged as one run of ``<experiment>-reports``, an
experiment of its own, not among the pipeline runs it summarises.
"""
from __future__ import annotations

from pathlib import Path

from kdprune.tracking.store import KIND_TAG, artifact_location, ensure_experiment, quiet_links, retry

def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def reports_experiment(experiment: str) -> str:
    """Report runs live in their own experiment, not among the pipeline runs they summarise."""
    return f"{experiment}-reports"


def log_summary(uri: str, experiment: str, files: list[Path], n_runs: int, kind: str = "report") -> str:
    """A summary run (``kind``: report, frontier, study) in ``<experiment>-reports`` holding ``files``."""
    from mlflow.tracking import MlflowClient  # heavy optional dependency: only when logging

    quiet_links(uri)
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, reports_experiment(experiment), artifact_location())
    name = f"{kind} ({plural(n_runs, 'run')} of {experiment})"
    tags = {KIND_TAG: kind, "kdprune.experiment": experiment}
    run = retry(lambda: client.create_run(exp_id, run_name=name, tags=tags), "create run")
    for f in files:
        retry(lambda: client.log_artifact(run.info.run_id, str(f)), "log artifact")
    retry(lambda: client.set_terminated(run.info.run_id, "FINISHED"), "finish run")
    return run.info.run_id
