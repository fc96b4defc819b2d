import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import kdprune.tracking.__main__ as tracking_cli
from kdprune.experiments import queue as exp_queue
from kdprune.params import Params
from kdprune.tracking import pipeline as tracking_pipeline
from kdprune.tracking import result as tracking_result
from kdprune.tracking import store as tracking_store
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty mlflow.db: creating one runs MLflow's migrations (~10 s here), copying it does not."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    client_for(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(autouse=True)
def store(tmp_path, empty_store) -> Path:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return tmp_path / "mlflow.db"


def test_uri_defaults_to_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_store.tracking_uri({}) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_store.artifact_location({}) == (tmp_path.resolve() / "mlartifacts").as_uri()


def test_uri_follows_dvc_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. .dvc/tmp/exps/<temp> while DVC_ROOT is the main repo
    env = {"DVC_ROOT": "/repo/main"}
    assert tracking_store.tracking_uri(env) == "sqlite:////repo/main/mlflow.db"
    assert tracking_store.artifact_location(env) == "file:///repo/main/mlartifacts"


def test_user_tracking_uri_wins():
    env = {"DVC_ROOT": "/repo/main", "MLFLOW_TRACKING_URI": "http://tracking.example:5000"}
    assert tracking_store.tracking_uri(env) == "http://tracking.example:5000"


def tiny_onnx(path: Path, channels: int = 1, size: int = 4, classes: int = 3) -> None:
    """A real ONNX classifier (Flatten -> Gemm), input 'x' (batch, C, H, W), output 'logits' (batch, classes)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = channels * size * size
    w = numpy_helper.from_array(np.full((n, classes), 0.01, dtype=np.float32), "w")
    b = numpy_helper.from_array(np.zeros(classes, dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w", "b"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_result(workdir: Path, ratio: float = 0.8, acc_kd: float = 90.0, seed: int = 0, wall: float | None = None,
                models: bool = False, layout: str = "split", **overrides) -> None:
    """A pipeline result as the stages leave it (params.yaml, metrics/, plots/, logs/, models/export/); no training.

    layout "split": each metric in one file (teacher.json, prune.json, distill/<v>.json, evaluate.json);
    "flat": evaluate.json repeats the headline numbers and the stage files hold extra non-metric keys."""
    p = Params().to_dict()
    p["prune"]["ratio"], p["seed"], p["distill"]["variants"] = ratio, seed, ["kd", "finetune"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for d in ("metrics/distill", "plots/distill", "logs", "models/export"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
    files = {
        "teacher.json": {"acc_teacher": 91.0, "params_teacher": 1000, "macs_teacher": 5000},
        "prune.json": {"acc_pruned": 40.0, "compression_ratio": 1 / (1 - ratio),
                       "prunable_compression_ratio": 1 / (1 - ratio) + 0.123456, "mac_reduction": 1.0,
                       "prunable_sparsity": ratio, "params_pruned": 1000},
        "distill/kd.json": {"acc_kd": acc_kd},
        "distill/finetune.json": {"acc_finetune": 89.0},
        "evaluate.json": {"params_kd": 1000, "nonzero_params_kd": int(1000 * (1 - ratio)), "bytes_onnx_kd": 4000},
    }
    for key, value in overrides.items():
        next((d for d in files.values() if key in d), files["evaluate.json"])[key] = value
    if layout == "flat":
        for name in ("teacher.json", "prune.json", "distill/kd.json", "distill/finetune.json"):
            files["evaluate.json"].update(files[name])
        files["prune.json"].update(method="magnitude", params=1000, ratio=ratio)
        files["distill/kd.json"].update(epochs=1, alpha=0.9)
        files["evaluate.json"]["prune_method"] = "magnitude"
    for name, data in files.items():
        (workdir / "metrics" / name).write_text(json.dumps(data))  # NaN / Infinity as json.dump writes them
    (workdir / "plots" / "teacher.csv").write_text("epoch,train_loss,test_acc\n1,0.9,\n2,0.5,88.5\n")
    (workdir / "plots" / "distill" / "kd.csv").write_text("epoch,train_loss,test_acc\n1,0.3,89.0\n")
    (workdir / "plots" / "accuracy_vs_compression.png").write_bytes(b"a sweep report, not part of this run")
    if wall is not None:
        (workdir / "logs" / "teacher.json").write_text(json.dumps({"wall_seconds": wall, "train_seconds": wall - 1}))
    if models:
        for v in ("kd", "finetune"):
            tiny_onnx(workdir / "models" / "export" / f"{v}.onnx")
            (workdir / "models" / "export" / f"{v}.kdc").write_bytes(b"KDPC1\n" + bytes(10))


def client_for(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def runs(uri, experiment="kdprune"):
    from mlflow.entities import ViewType

    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL) if exp else []


def test_a_mac_target_run_is_named_by_the_channel_ratio_it_reached(tmp_path, capsys):
    """Old: with prune.target_macs_reduction the run was named by prune.ratio (the default 0.8, not used),
    while the channel ratio reached was 0.304."""
    make_result(tmp_path, 0.8, 90.0)
    p = yaml.safe_load((tmp_path / "params.yaml").read_text())
    p["prune"].update(method="channel", target_macs_reduction=2.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    prune_json = tmp_path / "metrics" / "prune.json"  # what the prune stage writes for channel pruning
    prune_json.write_text(json.dumps({**json.loads(prune_json.read_text()), "channel_ratio": 0.30399999,
                                      "reached_macs_reduction": 2.0123}))
    env = {"DVC_ROOT": str(tmp_path), "DVC_EXP_NAME": "exp-c"}
    info = tracking_result.collect(tmp_path)
    assert info["reached"] == {"channel_ratio": 0.30399999, "reached_macs_reduction": 2.0123}
    assert "channel_ratio" not in info["metrics"]  # a name, not new metrics: the logged result is unchanged
    tracking_pipeline.log_pipeline(tmp_path, env)
    (found,) = runs(tracking_store.tracking_uri(env))
    assert found.info.run_name == "channel-0.304-macs/2-kd+finetune-s0-fashion_mnist-exp-c"
    assert "'channel-0.304-macs/2-kd+finetune-s0-fashion_mnist-exp-c'" in capsys.readouterr().out
    params = tracking_result.flatten(p)
    assert tracking_result.run_name(params, None) == "channel-macs/2-kd+finetune-s0-fashion_mnist"  # not reached
    params.update({"prune.target_macs_reduction": None})  # by ratio: the ratio asked is the ratio reached
    assert tracking_result.run_name(params, "e", {"channel_ratio": 0.8}) == "channel-0.8-kd+finetune-s0-fashion_mnist-e"


def test_log_once_then_dedup_then_new_result(tmp_path):
    make_result(tmp_path, 0.8, 90.0, acc_finetune=89.123456, compression_ratio=4.830641153081511)
    env = {"DVC_ROOT": str(tmp_path), "DVC_EXP_NAME": "exp-a", "DVC_EXP_BASELINE_REV": "abc123"}
    uri = tracking_store.tracking_uri(env)
    run_id = tracking_pipeline.log_pipeline(tmp_path, env)
    assert tracking_pipeline.log_pipeline(tmp_path, env) == run_id  # same result: no duplicate
    (found,) = runs(uri)
    assert found.info.status == "FINISHED"
    assert found.data.params["prune.ratio"] == "0.8"
    assert found.data.metrics["acc_kd"] == 90.0
    assert found.data.tags["dvc_exp_name"] == "exp-a" and found.data.tags["dvc_baseline_rev"] == "abc123"
    # what differs first: method, ratio, variants, seed, dataset, then the DVC experiment
    assert found.info.run_name == "magnitude-0.8-kd+finetune-s0-fashion_mnist-exp-a"
    # headline metrics rounded for reading; the logged JSON keeps full precision
    assert found.data.metrics["acc_finetune"] == 89.12 and found.data.metrics["compression_ratio"] == 4.83
    assert found.data.metrics["prunable_compression_ratio"] == 5.12
    client = client_for(uri)
    local = client.download_artifacts(run_id, "metrics/prune.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())["compression_ratio"] == 4.830641153081511
    hist = client.get_metric_history(run_id, "teacher_train_loss")
    assert [(m.step, m.value) for m in hist] == [(1, 0.9), (2, 0.5)]
    assert [m.step for m in client.get_metric_history(run_id, "teacher_test_acc")] == [2]
    artifacts = {a.path for a in client.list_artifacts(run_id, "metrics")}
    assert "metrics/evaluate.json" in artifacts
    assert [m.value for m in client.get_metric_history(run_id, "kd_train_loss")] == [0.3]
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert "plots/teacher.csv" in plots and "plots/accuracy_vs_compression.png" not in plots
    assert (tmp_path / "mlartifacts").is_dir()
    exp = client.get_experiment_by_name("kdprune")
    assert exp.tags[tracking_store.EXPERIMENT_KIND_TAG] == "custom_model_development"

    make_result(tmp_path, 0.9, 88.0)
    tracking_pipeline.log_pipeline(tmp_path, env)
    assert sorted(r.data.params["prune.ratio"] for r in runs(uri)) == ["0.8", "0.9"]


def test_existing_experiment_gets_the_runs_table_kind(tmp_path):
    """An experiment created before (without the tag) opens on MLflow 3's GenAI view until it is tagged."""
    make_result(tmp_path)
    env = {"DVC_ROOT": str(tmp_path)}
    client = client_for(tracking_store.tracking_uri(env))
    exp_id = client.create_experiment("kdprune", artifact_location=tracking_store.artifact_location(env))
    assert tracking_store.EXPERIMENT_KIND_TAG not in client.get_experiment(exp_id).tags
    tracking_pipeline.log_pipeline(tmp_path, env)
    assert client.get_experiment(exp_id).tags[tracking_store.EXPERIMENT_KIND_TAG] == "custom_model_development"


@pytest.mark.parametrize("where,key,value", [
    ("distill/kd.json", "acc_kd", float("nan")),
    ("prune.json", "compression_ratio", float("inf")),
    ("prune.json", "acc_pruned", None),  # missing
    ("teacher.json", "acc_teacher", float("-inf")),
    ("prune.json", "mac_reduction", "fast"),
])
@pytest.mark.parametrize("layout", ["split", "flat"])
def test_non_finite_result_is_never_logged(tmp_path, where, key, value, layout):
    make_result(tmp_path, layout=layout)
    paths = [tmp_path / "metrics" / where] + ([tmp_path / "metrics" / "evaluate.json"] if layout == "flat" else [])
    for path in paths:
        data = json.loads(path.read_text())
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
        path.write_text(json.dumps(data))  # json writes NaN / Infinity, as json.dump of a float nan does
    env = {"DVC_ROOT": str(tmp_path)}
    with pytest.raises(tracking_store.TrackingError) as e:
        tracking_pipeline.log_pipeline(tmp_path, env)
    msg = str(e.value)
    assert f"metrics/{where}" in msg and key in msg and "\n" not in msg
    assert isinstance(e.value, tracking_store.TrackingUserError)  # track exits 2
    assert runs(tracking_store.tracking_uri(env)) == []


def test_both_metrics_layouts_log_the_same_headline_numbers(tmp_path):
    """Each metric in one file, or evaluate.json repeating them: the run holds the same metrics, and the
    stage files' generic keys (epochs, method, ...) are not logged as metrics."""
    got = {}
    for layout in ("split", "flat"):
        d = tmp_path / layout
        d.mkdir()
        make_result(d, layout=layout)
        got[layout] = tracking_result.collect(d)["metrics"]
    assert got["split"] == got["flat"]
    assert {"acc_teacher", "acc_pruned", "acc_kd", "acc_finetune", "compression_ratio", "params_teacher",
            "params_pruned", "prunable_sparsity"} <= set(got["split"])
    assert not {"epochs", "alpha", "ratio", "params", "method"} & set(got["flat"])


def track_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return env


def test_track_stage_exits_2_on_nan_accuracy(tmp_path):
    make_result(tmp_path, acc_kd=float("nan"))
    r = subprocess.run([sys.executable, "-m", "stages.track"], cwd=tmp_path, env=track_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "metrics/distill/kd.json" in line and "acc_kd" in line and "nan" in line.lower()
    assert runs(f"sqlite:///{tmp_path.resolve()}/mlflow.db") == []


def killed(*args, **kwargs):
    raise KeyboardInterrupt("killed")  # not an Exception: nothing in track catches it, as with a SIGKILL


@pytest.mark.parametrize("where", ["models", "finish"])
def test_killed_track_is_completed_by_the_next_track(tmp_path, monkeypatch, where):
    """A kill while `track` logs the students, or just before it marks the run FINISHED, leaves the run
    RUNNING; the next `track` completes that run: one FINISHED run per result, nothing logged twice."""
    from mlflow.tracking import MlflowClient

    make_result(tmp_path, models=True)
    env = {"DVC_ROOT": str(tmp_path)}
    uri = tracking_store.tracking_uri(env)
    with monkeypatch.context() as m:
        if where == "models":
            m.setattr(tracking_pipeline, "log_student", killed)
        else:
            m.setattr(MlflowClient, "set_terminated", killed)
        with pytest.raises(KeyboardInterrupt):
            tracking_pipeline.log_pipeline(tmp_path, env)
    (left,) = runs(uri)
    assert left.info.status == "RUNNING"
    run_id = tracking_pipeline.log_pipeline(tmp_path, env)
    (run,) = runs(uri)  # exactly one run for the result: the interrupted one, completed
    assert run.info.run_id == run_id == left.info.run_id and run.info.status == "FINISHED"
    assert run.data.metrics["acc_kd"] == 90.0
    client = client_for(uri)
    assert [m.value for m in client.get_metric_history(run_id, "kd_train_loss")] == [0.3]  # not logged twice
    assert [m.value for m in client.get_metric_history(run_id, "acc_kd")] == [90.0]
    assert sorted(tracking_pipeline._run_models(client, run_id)) == ["student-finetune", "student-kd"]
    assert len(client.get_run(run_id).outputs.model_outputs) == 2


def test_stale_running_twin_is_killed_and_not_counted(tmp_path, monkeypatch):
    """A RUNNING twin beside the FINISHED run of the same result (left by a kill of an older `track`):
    the next track marks it KILLED; the sweep counts only FINISHED runs."""
    make_result(tmp_path)
    env = {"DVC_ROOT": str(tmp_path), "DVC_EXP_NAME": "exp-a"}
    uri = tracking_store.tracking_uri(env)
    run_id = tracking_pipeline.log_pipeline(tmp_path, env)
    client = client_for(uri)
    exp_id = client.get_experiment_by_name("kdprune").experiment_id
    twin = client.create_run(exp_id, tags={tracking_store.FINGERPRINT_TAG: runs(uri)[0].data.tags[tracking_store.FINGERPRINT_TAG],
                                           tracking_store.KIND_TAG: "pipeline", "dvc_exp_name": "exp-a"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert exp_queue.run_names("kdprune") == {"exp-a": 1}  # the RUNNING twin is not a result
    assert tracking_pipeline.log_pipeline(tmp_path, env) == run_id
    assert client.get_run(twin.info.run_id).info.status == "KILLED"
    assert sorted(r.info.status for r in runs(uri)) == ["FINISHED", "KILLED"]


def test_read_only_store_is_named(tmp_path, monkeypatch):
    """The store refuses writes (as SQLite does on a read-only mlflow.db): one line with the path and
    'read-only', not "'NoneType' object has no attribute 'experiment_id'"."""
    import mlflow
    from mlflow.tracking import MlflowClient

    make_result(tmp_path)
    env = {"DVC_ROOT": str(tmp_path)}

    def refuse(self, *args, **kwargs):
        raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) attempt to write a readonly database")

    monkeypatch.setattr(MlflowClient, "create_experiment", refuse)
    with pytest.raises(tracking_store.TrackingError) as e:
        tracking_pipeline.log_pipeline(tmp_path, env)
    msg = str(e.value)
    assert str(tmp_path / "mlflow.db") in msg and "read-only" in msg and "NoneType" not in msg and "\n" not in msg
    assert isinstance(e.value, tracking_store.TrackingUserError)  # track exits 2


@contextlib.contextmanager
def read_only(path: Path):
    """chmod a-w; as root (who writes anyway) the immutable attribute, where the file system has it."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: cannot make a file read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_read_only_store_file_is_named(tmp_path):
    """The probe: mlflow.db read-only, `track` exits 2 with one line naming the file and 'read-only'."""
    make_result(tmp_path)
    db = tmp_path / "mlflow.db"  # an initialised, empty store (the fixture)
    with read_only(db):
        r = subprocess.run([sys.executable, "-m", "stages.track"], cwd=tmp_path, env=track_env(),
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert str(db) in line and "read-only" in line and "NoneType" not in line


def test_relog_restores_deleted_artifacts_and_models(tmp_path, monkeypatch, capsys):
    make_result(tmp_path, models=True)
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith(("DVC_", "MLFLOW_TRACKING"))]:
        monkeypatch.delenv(k)
    assert tracking_cli.main(["relog"]) == 0
    uri = tracking_store.tracking_uri({"DVC_ROOT": str(tmp_path)})
    (run,) = runs(uri)
    shutil.rmtree(tmp_path / "mlartifacts")
    assert tracking_cli.main(["relog"]) == 0
    assert "restored" in capsys.readouterr().out
    client = client_for(uri)
    assert "metrics/evaluate.json" in {a.path for a in client.list_artifacts(run.info.run_id, "metrics")}
    assert (tmp_path / "mlartifacts").is_dir()
    models = tracking_pipeline._run_models(client, run.info.run_id)
    assert sorted(models) == ["student-finetune", "student-kd"]
    import mlflow.onnx
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        assert mlflow.onnx.load_model(f"models:/{models['student-kd'].model_id}").graph.output[0].name == "logits"
    assert len(runs(uri)) == 1


def test_run_times_come_from_the_pipeline_logs(tmp_path):
    make_result(tmp_path, wall=30.0)
    now = os.path.getmtime(tmp_path / "logs" / "teacher.json")
    env = {"DVC_ROOT": str(tmp_path)}
    run_id = tracking_pipeline.log_pipeline(tmp_path, env)
    info = client_for(tracking_store.tracking_uri(env)).get_run(run_id).info
    assert info.start_time == pytest.approx((now - 30.0) * 1000, abs=5)
    assert info.end_time - info.start_time >= 30_000


def test_run_time_leaves_out_stages_from_an_earlier_invocation(tmp_path):
    """`dvc exp run` after a `dvc repro`: the teacher did not rerun (its log is from the repro, minutes
    earlier); the run spans only the stages that ran for this result."""
    make_result(tmp_path)
    now = os.path.getmtime(tmp_path / "metrics" / "distill" / "kd.json")
    logs = {"teacher": (now - 900, 200.0), "distill_finetune": (now - 40, 20.0), "distill_kd": (now - 5, 30.0)}
    for name, (mtime, wall) in logs.items():
        path = tmp_path / "logs" / f"{name}.json"
        path.write_text(json.dumps({"wall_seconds": wall}))
        os.utime(path, (mtime, mtime))
    for path in (tmp_path / "metrics" / "teacher.json",):
        os.utime(path, (now - 900, now - 900))  # an unchanged stage's output keeps its old mtime
    start, end, how = tracking_result.pipeline_times(tmp_path, tracking_result.result_files(tmp_path))
    assert start == pytest.approx((now - 60) * 1000, abs=2) and "logs" in how
    assert end >= int(now * 1000) - 1


def test_headline_rounding():
    h = tracking_result.headline({"acc_kd": 91.23456, "compression_ratio": 9.2745, "mac_reduction": 1.0,
                           "speedup_b1_kd": 1.23456, "params_kd": 77754.0, "prunable_sparsity": 0.8000052})
    assert h == {"acc_kd": 91.23, "compression_ratio": 9.27, "mac_reduction": 1.0, "speedup_b1_kd": 1.23,
                 "params_kd": 77754.0, "prunable_sparsity": 0.8}
    assert math.isnan(tracking_result.headline({"x": float("nan")})["x"])


def test_unreachable_server_keeps_files_and_says_how_to_relog(tmp_path, monkeypatch):
    make_result(tmp_path, 0.8, 90.0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", tracking_store.WAIT_ENV: "0"}  # discard port: nothing listens
    with pytest.raises(tracking_store.TrackingError, match="relog"):
        tracking_pipeline.log_pipeline(tmp_path, env)
    assert json.loads((tmp_path / "metrics" / "distill" / "kd.json").read_text())["acc_kd"] == 90.0


def test_a_server_that_does_not_answer_is_tried_again_then_given_up(tmp_path, monkeypatch, capsys):
    """A tracking server that is down (connection refused) is tried again with backoff for KDPRUNE_MLFLOW_WAIT_S
    seconds, then the usual one-line error; an answer that refuses the request (401) is not waited on."""
    import requests

    make_result(tmp_path)
    sleeps, calls = [], []
    monkeypatch.setattr(tracking_pipeline.time, "sleep", sleeps.append)
    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr(tracking_pipeline.time, "monotonic", lambda: next(clock))

    def down(*args):
        calls.append(1)
        raise RuntimeError("API request to http://h/api failed with exception "
                           "HTTPConnectionPool(host='h', port=5000): Max retries exceeded")

    monkeypatch.setattr(tracking_pipeline, "_log_once", down)
    env = {"MLFLOW_TRACKING_URI": "http://h:5000", tracking_store.WAIT_ENV: "60"}
    with pytest.raises(tracking_store.TrackingError, match="could not log to MLflow at http://h:5000: .*relog"):
        tracking_pipeline.log_pipeline(tmp_path, env)
    assert 3 <= len(calls) <= 10 and sleeps[:3] == [2.0, 4.0, 8.0] and max(sleeps) <= 30
    assert "did not answer" in capsys.readouterr().err

    calls.clear()
    answers = [requests.exceptions.ConnectionError("refused"), "run-1"]

    def restarts(*args):  # down once, then back
        calls.append(1)
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr(tracking_pipeline, "_log_once", restarts)
    assert tracking_pipeline.log_pipeline(tmp_path, env) == "run-1" and len(calls) == 2

    calls.clear()

    def refused(*args):
        calls.append(1)
        raise RuntimeError("API request to endpoint /api/2.0/mlflow/experiments/get-by-name failed with error code "
                           "401 != 200. Response body: 'You are not authenticated.'")

    monkeypatch.setattr(tracking_pipeline, "_log_once", refused)
    with pytest.raises(tracking_store.TrackingError, match="401"):
        tracking_pipeline.log_pipeline(tmp_path, env)
    assert len(calls) == 1
    for bad in ("-1", "nan", "abc", "86401"):
        with pytest.raises(tracking_store.TrackingUserError, match=f"KDPRUNE_MLFLOW_WAIT_S = '{bad}' is invalid: must be"):
            tracking_pipeline.log_pipeline(tmp_path, dict(env, KDPRUNE_MLFLOW_WAIT_S=bad))
    assert tracking_store.is_outage(RuntimeError("x: failed with error code 503 != 200"))
    assert not tracking_store.is_outage(ValueError("bad metric"))
    for status in ("401", "403"):  # a server that refuses us: the user's to fix (exit 2), with what to set
        e = tracking_store.store_error("http://h:5000", RuntimeError(f"API request to endpoint /x failed with error code "
                                                               f"{status} != 200. Response body: 'denied'"))
        assert isinstance(e, tracking_store.TrackingUserError) and f"HTTP {status}" in str(e)
        assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in str(e) and "MLFLOW_TRACKING_TOKEN" in str(e)


def test_missing_metrics_is_clear(tmp_path):
    make_result(tmp_path)
    (tmp_path / "metrics" / "evaluate.json").unlink()
    with pytest.raises(tracking_store.TrackingUserError, match="evaluate.json: not found"):  # exit 2
        tracking_pipeline.log_pipeline(tmp_path, {"DVC_ROOT": str(tmp_path)})
    (tmp_path / "metrics" / "evaluate.json").write_text('{"acc_teacher": 91.0, ')  # half a file
    with pytest.raises(tracking_store.TrackingUserError, match="evaluate.json: not valid JSON"):
        tracking_pipeline.log_pipeline(tmp_path, {"DVC_ROOT": str(tmp_path)})


def test_track_stage_with_unreachable_server_loses_nothing_then_relog_works(tmp_path):
    """The track stage against a dead server: exit non-zero, files untouched, message says how to re-log;
    `python -m kdprune.tracking relog` then logs the same files once the store is reachable."""
    make_result(tmp_path, 0.8, 90.0)
    before = {p: p.read_bytes() for p in (tmp_path / "metrics").rglob("*") if p.is_file()}
    env = track_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                    MLFLOW_HTTP_REQUEST_TIMEOUT="2", KDPRUNE_MLFLOW_WAIT_S="0")
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, store):
    """A real `mlflow server` on the test's SQLite store (job execution off, one worker), as the README starts it."""
    import urllib.request

    port = free_port()
    env = track_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{store}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                import time

                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-3000:])
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def rest(url: str, method: str, path: str, body: dict | None = None) -> dict:
    import urllib.request

    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_pipeline_run_as_the_ui_sees_it_over_rest(tmp_path, mlflow_server, monkeypatch):
    """Through MLflow's REST API (what the UI reads): the experiment opens on the runs table, the run has its
    students as models (registrable), the dataset as input, git source tags and the pipeline's real duration."""
    import mlflow

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=tmp_path, check=True)
    make_result(tmp_path, wall=42.0, models=True)
    env = {"DVC_ROOT": str(tmp_path), "MLFLOW_TRACKING_URI": mlflow_server, "DVC_EXP_NAME": "exp-rest"}
    run_id = tracking_pipeline.log_pipeline(tmp_path, env)

    exp = rest(mlflow_server, "GET", "experiments/get-by-name?experiment_name=kdprune")["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]
    (run,) = rest(mlflow_server, "POST", "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    info = run["info"]
    assert info["run_id"] == run_id and info["status"] == "FINISHED"
    assert info["run_name"] == "magnitude-0.8-kd+finetune-s0-fashion_mnist-exp-rest"
    assert int(info["end_time"]) - int(info["start_time"]) >= 42_000  # the pipeline's time, not track's 100 ms
    (ds,) = run["inputs"]["dataset_inputs"]
    assert ds["dataset"]["name"] == "fashion_mnist" and ds["dataset"]["digest"]
    assert {t["key"]: t["value"] for t in ds["tags"]}["mlflow.data.context"] == "train"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.source.type"] == "PROJECT"
    assert tags["mlflow.source.name"].endswith("dvc.yaml")
    model_ids = {m["model_id"] for m in run["outputs"]["model_outputs"]}
    models = rest(mlflow_server, "POST", "logged-models/search", {"experiment_ids": [exp["experiment_id"]]})["models"]
    kd = [m for m in models if m["info"]["name"] == "student-kd"]
    assert {m["info"]["model_id"] for m in models} == model_ids and len(kd) == 1
    assert kd[0]["info"]["source_run_id"] == run_id and kd[0]["info"]["status"] == "LOGGED_MODEL_READY"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    version = mlflow.register_model(f"runs:/{run_id}/student-kd", "kdprune-student")
    assert version.version == "1"
    got = rest(mlflow_server, "GET", "model-versions/get?name=kdprune-student&version=1")["model_version"]
    assert got["run_id"] == run_id and got["status"] == "READY"
    sig = json.loads(mlflow.models.get_model_info(f"models:/kdprune-student/1").signature.to_dict()["inputs"])
    assert sig[0]["tensor-spec"]["shape"] == [-1, 1, 4, 4]


def test_student_without_onnx_is_logged_as_pytorch_model(tmp_path):
    """evaluate.onnx off (or no onnx installed): the student checkpoint is logged in MLflow's PyTorch flavour
    (pt2 via torch.export, no pickled module) and loads back to the same logits."""
    import mlflow.pytorch
    import torch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from kdprune import checkpoint
    from kdprune.models import build_model, resnet_spec

    make_result(tmp_path)
    (tmp_path / "models" / "students").mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model(resnet_spec(8, 4, 1, 10)).eval()
    checkpoint.save_checkpoint(tmp_path / "models" / "students" / "kd.pt", model, meta={"input_shape": [1, 12, 12]})
    env = {"DVC_ROOT": str(tmp_path)}
    uri = tracking_store.tracking_uri(env)
    run_id = tracking_pipeline.log_pipeline(tmp_path, env)
    models = tracking_pipeline._run_models(client_for(uri), run_id)
    assert list(models) == ["student-kd"] and models["student-kd"].tags["flavor"] == "pytorch"
    x = torch.randn(2, 1, 12, 12)
    with _use_tracking_uri(uri):
        loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/student-kd")
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_a_cached_teachers_training_time_is_labelled_as_such(tmp_path):
    """Old: teacher_train_seconds was logged on experiments that reused the cached teacher (its log was left in
    logs/ by the run that trained it). New: only the stages that ran for this result give <stage>_*_seconds."""
    make_result(tmp_path, wall=600.0)
    now = time.time()
    (tmp_path / "logs" / "distill_kd.json").write_text(json.dumps({"wall_seconds": 30.0, "train_seconds": 29.0,
                                                                    "bf16": 1}))
    teacher_log = json.loads((tmp_path / "logs" / "teacher.json").read_text())
    (tmp_path / "logs" / "teacher.json").write_text(json.dumps({**teacher_log, "bf16": 0}))
    os.utime(tmp_path / "logs" / "teacher.json", (now - 7200, now - 7200))  # trained two hours ago
    metrics = tracking_result.collect(tmp_path)["metrics"]
    assert "cached_teacher_train_seconds" in metrics and "teacher_train_seconds" not in metrics
    assert metrics["distill_kd_train_seconds"] == 29.0
    assert metrics["distill_kd_bf16"] == 1.0 and metrics["cached_teacher_bf16"] == 0.0 and "teacher_bf16" not in metrics
    os.utime(tmp_path / "logs" / "teacher.json", (now - 40, now - 40))  # trained just before distill
    metrics = tracking_result.collect(tmp_path)["metrics"]
    assert metrics["teacher_train_seconds"] == 599.0 and "cached_teacher_train_seconds" not in metrics
    # ... but in the previous invocation: this one's validate stage rewrote data/params.valid after it (seen in
    # tests/pipeline/test_e2e.py on a quiet machine, where the next experiment began 40 s after the teacher)
    marker = tmp_path / "data" / "params.valid"
    marker.parent.mkdir(exist_ok=True)
    marker.write_text("valid\n")
    os.utime(marker, (now - 35, now - 35))
    metrics = tracking_result.collect(tmp_path)["metrics"]
    assert "cached_teacher_train_seconds" in metrics and "teacher_train_seconds" not in metrics
    assert metrics["distill_kd_train_seconds"] == 29.0 and metrics["cached_teacher_bf16"] == 0.0
    os.utime(marker, (now - 2000, now - 2000))  # this invocation trained the teacher too: it is this run's
    assert tracking_result.collect(tmp_path)["metrics"]["teacher_train_seconds"] == 599.0
