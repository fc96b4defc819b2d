"""The real pipeline, end to end: `dvc repro` then `dvc exp run -S prune.ratio=...` in a temp git repo
on tiny format-true data, checking caching, metrics and the MLflow store."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from kdprune import metrics
from kdprune.train.runtime import bf16_choice
from tests.helpers import default_params, write_fake_dataset

ROOT = Path(__file__).resolve().parents[2]
COPY = ["kdprune", "stages", "teachers", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore"]  # params.yaml: tiny_params


def tiny_params(raw_root: Path) -> dict:
    p = default_params()
    p["data"].update(root=str(raw_root), download=False, train_subset=300, test_subset=100)
    p["model"].update(depth=8, width=4)
    p["teacher"].update(epochs=2, batch_size=64, lr=0.2)
    p["distill"].update(epochs=1, batch_size=64)
    p["prune"]["ratio"] = 0.5
    return p


def make_repo(tmp_path: Path, venv_bin: Path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in COPY:
        src, dst = ROOT / item, repo / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    raw = write_fake_dataset(tmp_path / "raw", n_train=300, n_test=100)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(raw), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "GIT_"))}
    env.update(PATH=f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}", DVC_NO_ANALYTICS="1",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_SITE_CACHE_DIR=str(tmp_path / "site-cache"), CI="true",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    git(repo, env, "init", "-q", "-b", "main")
    git(repo, env, "add", "-A")
    # one fixed date for the first commit: the same tree gives the same commit in every repo, and the ONNX files
    # name it (kdprune.deploy.ship.code_commit). Not in env: DVC's own git commits refuse these variables.
    git(repo, dict(env, GIT_AUTHOR_DATE="2026-01-01T00:00:00Z", GIT_COMMITTER_DATE="2026-01-01T00:00:00Z"),
        "commit", "-qm", "init")
    return repo, env


def git(repo, env, *args):
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def dvc(repo, env, *args) -> str:
    r = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def mlflow_runs(repo: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("kdprune")
    return client.search_runs([exp.experiment_id])


def lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)



def test_repro_then_exp_run_reuses_teacher_and_logs_two_runs(tmp_path, venv_bin):
    repo, env = make_repo(tmp_path, venv_bin)

    out = dvc(repo, env, "repro")
    assert "Running stage 'train_teacher'" in out
    first = metrics.collect(repo)
    assert first["prunable_compression_ratio"] == pytest.approx(2.0, rel=1e-3)
    for key in ("acc_teacher", "acc_pruned", "acc_kd", "acc_finetune", "compression_ratio", "macs_teacher"):
        assert key in first
    assert (repo / "plots/accuracy.png").stat().st_size > 1000
    assert len(mlflow_runs(repo)) == 1
    teacher_md5 = lock_md5(repo, "train_teacher", "models/teacher.pt")
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-qm", "baseline")

    out = dvc(repo, env, "repro")  # no-op: only validate and track run (both always_changed); nothing is logged again
    assert re.findall(r"Running stage '(\w+)'", out) == ["validate", "track"] and "already logged" in out
    assert len(mlflow_runs(repo)) == 1
    assert json.loads(dvc(repo, env, "status", "--json")) == {"validate": ["always changed"], "track": ["always changed"]}

    # a fresh clone (the team's cache shared) logs its first repro, though dvc.lock records track with these deps
    clone = tmp_path / "clone"
    git(tmp_path, env, "clone", "-q", str(repo), str(clone))
    dvc(clone, env, "cache", "dir", "--local", str(repo / ".dvc" / "cache"))
    out = dvc(clone, env, "repro")
    assert "Running stage 'track'" in out and "Stage 'track' didn't change" not in out
    (cloned,) = mlflow_runs(clone)
    assert cloned.data.params["prune.ratio"] == "0.5" and cloned.data.metrics["acc_kd"] == pytest.approx(first["acc_kd"], abs=0.005)
    out = dvc(clone, env, "repro")  # and a second one adds none
    assert re.findall(r"Running stage '(\w+)'", out) == ["validate", "track"] and len(mlflow_runs(clone)) == 1

    # with a per-layer floor (prune.min_layer_density): the ratio stays exact, no layer falls below 2 %
    out = dvc(repo, env, "exp", "run", "-S", "prune.ratio=0.95", "-S", "prune.min_layer_density=0.02")
    assert "Stage 'train_teacher' didn't change" in out and "Running stage 'train_teacher'" not in out
    assert "Running stage 'prune'" in out and "Running stage 'distill'" in out
    assert lock_md5(repo, "train_teacher", "models/teacher.pt") == teacher_md5
    second = metrics.collect(repo)
    assert second["prunable_compression_ratio"] == pytest.approx(20.0, rel=1e-3)
    assert second["compression_ratio"] > first["compression_ratio"]
    assert second["nonzero_params_kd"] < first["nonzero_params_kd"]
    assert second["acc_teacher"] == first["acc_teacher"]
    assert second["min_layer_density_pruned"] >= 0.02 > 0 < first["min_layer_density_pruned"] <= 0.5

    runs = mlflow_runs(repo)
    assert sorted(r.data.params["prune.ratio"] for r in runs) == ["0.5", "0.95"]
    by_ratio = {r.data.params["prune.ratio"]: r for r in runs}
    assert by_ratio["0.95"].data.metrics["prunable_compression_ratio"] == pytest.approx(20.0, rel=1e-3)
    assert by_ratio["0.95"].data.tags["dvc_exp_name"]  # named after the DVC experiment
    assert by_ratio["0.95"].data.params["model.width"] == "4"
    assert by_ratio["0.95"].data.params["prune.min_layer_density"] == "0.02"
    for r in runs:
        assert {"acc_teacher", "acc_kd", "acc_finetune", "acc_pruned", "compression_ratio"} <= set(r.data.metrics)
    # each run records the precision its training stages ran at (runtime.bf16 auto resolves per machine);
    # the cached teacher's as cached_teacher_bf16, as its times
    runtime = SimpleNamespace(bf16=yaml.safe_load((repo / "params.yaml").read_text())["runtime"]["bf16"])
    want = float(bf16_choice(runtime, torch.device("cpu"))[0])
    first_run, second_run = by_ratio["0.5"].data.metrics, by_ratio["0.95"].data.metrics
    assert first_run["teacher_bf16"] == want == first_run["distill_kd_bf16"]
    assert second_run["cached_teacher_bf16"] == want == second_run["distill_finetune_bf16"]
    assert "teacher_bf16" not in second_run

    relog = subprocess.run([str(venv_bin / "python"), "-m", "kdprune.tracking", "relog"], cwd=repo, env=env,
                           capture_output=True, text=True)
    assert relog.returncode == 0 and "already logged" in relog.stdout
    assert len(mlflow_runs(repo)) == 2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~4 min on 2 cores; CI runs -m "not slow" (30 min); the queue itself is exercised by test_frontier
def test_sweep_with_two_workers_loses_no_run_then_report_and_ui(tmp_path, venv_bin):
    import signal
    import time
    import urllib.request

    repo, env = make_repo(tmp_path, venv_bin)
    dvc(repo, env, "repro")
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-qm", "baseline")

    py = str(venv_bin / "python")
    r = subprocess.run([py, "-m", "kdprune.sweep", "--ratios", "0.6,0.7", "--seeds", "0,1", "-j", "2"], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed: none; missing: none; duplicated: none" in r.stdout

    runs = mlflow_runs(repo)
    assert len(runs) == 5  # the baseline + 4 queued experiments, none lost, none duplicated
    keys = sorted((r.data.params["prune.ratio"], r.data.params["seed"]) for r in runs)
    assert keys == [("0.5", "0"), ("0.6", "0"), ("0.6", "1"), ("0.7", "0"), ("0.7", "1")]
    for run in runs:  # artifacts live in the main repo, not in a deleted .dvc/tmp/exps workspace
        uri = run.info.artifact_uri
        assert uri.startswith((repo / "mlartifacts").as_uri()), uri
        assert (Path(uri.removeprefix("file://")) / "metrics" / "evaluate.json").exists()
    # seed 1's teacher was trained once: the second seed-1 experiment restored it from the run-cache
    logs = subprocess.run(["dvc", "queue", "logs", next(r.data.tags["dvc_exp_name"] for r in runs
                                                        if r.data.params["prune.ratio"] == "0.7"
                                                        and r.data.params["seed"] == "1")],
                          cwd=repo, env=env, capture_output=True, text=True).stdout
    assert "Running stage 'train_teacher'" not in logs

    rep = subprocess.run([py, "-m", "kdprune.report"], cwd=repo, env=env, capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    table = (repo / "metrics" / "report.csv").read_text()
    assert "kd_minus_finetune" in table and "0.7" in table
    assert len((repo / "metrics" / "report_runs.csv").read_text().splitlines()) == 1 + 5
    assert (repo / "plots" / "accuracy_vs_compression.png").stat().st_size > 1000

    port = free_port()
    ui_env = dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen([str(venv_bin / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{repo}/mlflow.db",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=repo, env=ui_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not come up"
                assert server.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        exp_id = runs[0].info.experiment_id
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp_id], "max_results": 100}).encode(),
                                     headers={"Content-Type": "application/json"})
        found = json.load(urllib.request.urlopen(req, timeout=10))["runs"]
        pipeline = [r for r in found if any(t["key"] == "kdprune.kind" and t["value"] == "pipeline"
                                            for t in r["data"].get("tags", []))]
        assert len(pipeline) == 5
        for run in pipeline:
            metrics = {m["key"] for m in run["data"]["metrics"]}
            assert {"acc_kd", "acc_finetune", "compression_ratio"} <= metrics
        assert all(r in pipeline for r in found)  # the report's summary run has its own experiment:
        reports = json.load(urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=kdprune-reports", timeout=10))
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST", data=json.dumps(
            {"experiment_ids": [reports["experiment"]["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"})
        assert any(r["info"]["run_name"].startswith("report") for r in json.load(urllib.request.urlopen(req))["runs"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
