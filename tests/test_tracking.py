import json
from pathlib import Path

import pytest

from kdprune import tracking
from tests.conftest import committed_params_text

ROOT = Path(__file__).resolve().parents[1]


def test_uri_defaults_to_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri({}) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.artifact_location({}) == (tmp_path.resolve() / "mlartifacts").as_uri()


def test_uri_follows_dvc_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. .dvc/tmp/exps/<temp> while DVC_ROOT is the main repo
    env = {"DVC_ROOT": "/repo/main"}
    assert tracking.tracking_uri(env) == "sqlite:////repo/main/mlflow.db"
    assert tracking.artifact_location(env) == "file:///repo/main/mlartifacts"


def test_user_tracking_uri_wins():
    env = {"DVC_ROOT": "/repo/main", "MLFLOW_TRACKING_URI": "http://tracking.example:5000"}
    assert tracking.tracking_uri(env) == "http://tracking.example:5000"


def make_result(workdir: Path, ratio: float, acc_kd: float) -> None:
    text = committed_params_text().replace("ratio: 0.8 ", f"ratio: {ratio} ")
    (workdir / "params.yaml").write_text(text)
    (workdir / "metrics" / "distill").mkdir(parents=True, exist_ok=True)
    (workdir / "plots").mkdir(exist_ok=True)
    for name, content in {"teacher.json": {"acc_teacher": 91.0},
                          "prune.json": {"acc_pruned": 30.0, "compression_ratio": 1 / (1 - ratio)},
                          "distill/kd.json": {"acc_kd": acc_kd}, "distill/finetune.json": {"acc_finetune": 89.0},
                          "evaluate.json": {"params_kd": 1000}}.items():
        (workdir / "metrics" / name).write_text(json.dumps(content))
    (workdir / "plots" / "teacher.csv").write_text("epoch,train_loss,test_acc\n1,0.9,\n2,0.5,88.5\n")
    (workdir / "plots" / "distill").mkdir(exist_ok=True)
    (workdir / "plots" / "distill" / "kd.csv").write_text("epoch,train_loss,test_acc\n1,0.3,89.0\n")
    (workdir / "plots" / "accuracy_vs_compression.png").write_bytes(b"a sweep report, not part of this run")


def runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdprune")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_log_once_then_dedup_then_new_result(tmp_path):
    make_result(tmp_path, 0.8, 90.0)
    env = {"DVC_ROOT": str(tmp_path), "DVC_EXP_NAME": "exp-a", "DVC_EXP_BASELINE_REV": "abc123"}
    uri = tracking.tracking_uri(env)
    run_id = tracking.log_pipeline(tmp_path, env)
    assert tracking.log_pipeline(tmp_path, env) == run_id  # same result: no duplicate
    (found,) = runs(uri)
    assert found.data.params["prune.ratio"] == "0.8"
    assert found.data.metrics["acc_kd"] == 90.0
    assert found.data.tags["dvc_exp_name"] == "exp-a" and found.data.tags["dvc_baseline_rev"] == "abc123"
    assert found.info.run_name.startswith("exp-a ratio=0.8 seed=0")
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(uri).get_metric_history(run_id, "teacher_train_loss")
    assert [(m.step, m.value) for m in hist] == [(1, 0.9), (2, 0.5)]
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "teacher_test_acc")] == [2]
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "metrics")}
    assert "metrics/evaluate.json" in artifacts
    assert [m.value for m in MlflowClient(uri).get_metric_history(run_id, "kd_train_loss")] == [0.3]
    plots = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "plots")}
    assert "plots/teacher.csv" in plots and "plots/accuracy_vs_compression.png" not in plots
    assert (tmp_path / "mlartifacts").is_dir()

    make_result(tmp_path, 0.9, 88.0)
    tracking.log_pipeline(tmp_path, env)
    assert sorted(r.data.params["prune.ratio"] for r in runs(uri)) == ["0.8", "0.9"]


def test_unreachable_server_keeps_files_and_says_how_to_relog(tmp_path, monkeypatch):
    make_result(tmp_path, 0.8, 90.0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # discard port: nothing listens
    with pytest.raises(tracking.TrackingError, match="relog"):
        tracking.log_pipeline(tmp_path, env)
    assert json.loads((tmp_path / "metrics" / "distill" / "kd.json").read_text())["acc_kd"] == 90.0


def test_missing_metrics_is_clear(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_text())
    with pytest.raises(tracking.TrackingError, match="evaluate.json: not found"):
        tracking.log_pipeline(tmp_path, {"DVC_ROOT": str(tmp_path)})


def test_track_stage_with_unreachable_server_loses_nothing_then_relog_works(tmp_path):
    """The track stage against a dead server: exit non-zero, files untouched, message says how to re-log;
    `python -m kdprune.tracking relog` then logs the same files once the store is reachable."""
    import os
    import subprocess
    import sys

    make_result(tmp_path, 0.8, 90.0)
    before = {p: p.read_bytes() for p in (tmp_path / "metrics").rglob("*") if p.is_file()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
               MLFLOW_HTTP_REQUEST_TIMEOUT="2", MLFLOW_DISABLE_TELEMETRY="true")
    r = subprocess.run([sys.executable, "-m", "stages.track"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert "http://127.0.0.1:9" in r.stderr and "python -m kdprune.tracking relog" in r.stderr
    assert "Nothing is lost" in r.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "metrics").rglob("*") if p.is_file()} == before

    del env["MLFLOW_TRACKING_URI"]  # the store is back (here: the local SQLite default)
    r = subprocess.run([sys.executable, "-m", "kdprune.tracking", "relog"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "logged run" in r.stdout, r.stdout + r.stderr
    (run,) = runs(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    assert run.data.metrics["acc_kd"] == 90.0
