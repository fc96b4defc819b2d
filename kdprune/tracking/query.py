"""Read the pipeline runs back from MLflow: one row per FINISHED pipeline run, and the per-run table a report
commits (so that each number can be traced without the git-ignored mlflow.db).
"""
from __future__ import annotations

import pandas as pd

from kdprune.tracking.store import finished_pipeline_runs, retry

def fetch_runs(uri: str, experiment: str) -> pd.DataFrame:
    """Every FINISHED pipeline run of ``experiment``: one row with its id, status, name, tags, every param
    (``params.<dotted key>``) and every metric."""
    from mlflow.tracking import MlflowClient  # heavy optional dependency: only when reading MLflow

    client = MlflowClient(uri)
    exp = retry(lambda: client.get_experiment_by_name(experiment), "get experiment")
    if exp is None:
        return pd.DataFrame()
    rows = []
    for r in finished_pipeline_runs(client, [exp.experiment_id]):
        row = {"run_id": r.info.run_id, "status": r.info.status, "run_name": r.info.run_name,
               "start_time": r.info.start_time, "end_time": r.info.end_time,
               "dvc_exp_name": r.data.tags.get("dvc_exp_name", ""), "git_commit": r.data.tags.get("git_commit", "")}
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update(r.data.metrics)
        rows.append(row)
    return pd.DataFrame(rows)


RUN_COLUMNS = ("run_id", "status", "run_name", "dvc_exp_name", "git_commit", "start_time", "end_time")


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs behind a report, for a clone without the MLflow store: one row per run with its id,
    status, tags, every param (dotted ``params.*`` columns) and every metric, in a stable column order."""
    meta = [c for c in RUN_COLUMNS if c in runs]
    params = sorted(c for c in runs if c.startswith("params."))
    metrics = sorted(c for c in runs if c not in meta and c not in params and c not in ("ratio", "seed"))
    return runs[meta + params + metrics].sort_values("run_id").reset_index(drop=True)
