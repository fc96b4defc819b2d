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

The package, by job (import the submodule you need; this file re-exports nothing):
  store     where runs go: the tracking URI, the artifact location, retries, a read-only or unreachable store,
            the wait for a tracking server, the experiment, the run tags
  result    one pipeline result collected from its files: params, metrics, curves, artifacts, times
  pipeline  log one pipeline result as exactly one FINISHED run (``log_pipeline``)
  query     read the pipeline runs back as a table (the reports' input)
  summary   log a report's files as a summary run in ``<experiment>-reports``
  __main__  the CLI: ``python -m kdprune.tracking relog``
"""
