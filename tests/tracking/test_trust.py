"""What `track` refuses to log, and what it never prints: a result whose params are not the ones its stages ran with
(dvc.lock), a password inside MLFLOW_TRACKING_URI, and a corrupt local store (a user error, not an outage)."""
import sqlite3
import subprocess
import sys

import pytest
import yaml

from kdprune.tracking import pipeline as tracking_pipeline
from kdprune.tracking import store as tracking_store
from tests.tracking.test_tracking import (empty_store, make_result, mlflow_server, runs, store,  # noqa: F401 - fixtures
                                          track_env)
from tests.helpers import ROOT

SECRET = "s3cr3t-Pa55"


def write_lock(workdir, params: dict, ratio_seen_by_prune: float | None = None) -> None:
    """A dvc.lock as DVC leaves it: validate recorded every key, prune the keys it lists (here: prune, seed)."""
    prune = {"seed": params["seed"], "prune": dict(params["prune"])}
    if ratio_seen_by_prune is not None:
        prune["prune"]["ratio"] = ratio_seen_by_prune
    lock = {"schema": "2.0", "stages": {
        "validate": {"cmd": "python -m stages.validate", "params": {"params.yaml": params}},
        "prune": {"cmd": "python -m stages.prune", "params": {"params.yaml": prune}},
        "distill@kd": {"cmd": "an old stage, no longer in dvc.yaml", "params": {"params.yaml": {"seed": 12345}}},
    }}
    (workdir / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    (workdir / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())


def test_a_result_whose_stages_ran_with_other_params_is_never_logged(tmp_path):
    """The race of two `dvc exp run` in one workspace: params.yaml says 0.6 now, but a stage ran with 0.5."""
    make_result(tmp_path, ratio=0.6)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    write_lock(tmp_path, params, ratio_seen_by_prune=0.5)
    with pytest.raises(tracking_store.TrackingUserError) as e:
        tracking_pipeline.log_pipeline(tmp_path, {"MLFLOW_TRACKING_URI": uri})
    msg = str(e.value)
    assert "prune.ratio is 0.6, but stage 'prune' ran with 0.5 (dvc.lock)" in msg and "nothing is logged" in msg
    assert "\n" not in msg and runs(uri) == []

    # the same through the stage: exit 2, one line, nothing logged
    r = subprocess.run([sys.executable, "-m", "stages.track"], cwd=tmp_path, env=track_env(MLFLOW_TRACKING_URI=uri),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {msg}"], r.stderr
    assert runs(uri) == []

    # validate saw other params than params.yaml has now (an edit, or a second run's -S, after it ran)
    write_lock(tmp_path, {**params, "seed": 7})
    with pytest.raises(tracking_store.TrackingUserError, match="seed is 0, but stage 'validate' ran with 7"):
        tracking_pipeline.log_pipeline(tmp_path, {"MLFLOW_TRACKING_URI": uri})

    # consistent (every stage that dvc.yaml has ran with these params; an old stage's entry is history): logged
    write_lock(tmp_path, params)
    tracking_pipeline.log_pipeline(tmp_path, {"MLFLOW_TRACKING_URI": uri})
    (run,) = runs(uri)
    assert run.data.params["prune.ratio"] == "0.6"


def test_lock_check_reads_params_as_dvc_does(tmp_path):
    """YAML 1.2 floats, as DVC writes them: `weight_decay: 5e-4` in params.yaml equals 0.0005 in dvc.lock."""
    make_result(tmp_path)
    text = (tmp_path / "params.yaml").read_text().replace("weight_decay: 0.0005\n", "weight_decay: 5e-4\n")
    assert yaml.safe_load(text)["teacher"]["weight_decay"] == "5e-4"  # PyYAML alone: a string, so the check
    (tmp_path / "params.yaml").write_text(text)                       # must read params.yaml as DVC does
    write_lock(tmp_path, {**yaml.safe_load(text), "teacher": {**yaml.safe_load(text)["teacher"], "weight_decay": 0.0005},
                          "distill": {**yaml.safe_load(text)["distill"], "weight_decay": 0.0005}})
    tracking_pipeline.log_pipeline(tmp_path, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert len(runs(f"sqlite:///{tmp_path}/mlflow.db")) == 1


def test_password_in_the_tracking_uri_is_never_printed(tmp_path, mlflow_server, capfd):
    """kdprune's own lines and mlflow's "View run ... at: <url>" lines print the URI: never its password."""
    make_result(tmp_path)
    uri = mlflow_server.replace("http://", f"http://kd-user:{SECRET}@")
    run_id = tracking_pipeline.log_pipeline(tmp_path, {"MLFLOW_TRACKING_URI": uri, tracking_store.WAIT_ENV: "0"})
    tracking_pipeline.log_pipeline(tmp_path, {"MLFLOW_TRACKING_URI": uri})  # "already logged as run ... (<uri>)"
    out = capfd.readouterr()
    assert run_id in out.out and "kd-user:***@" in out.out
    assert SECRET not in out.out + out.err
    (run,) = runs(mlflow_server)
    assert run.info.run_id == run_id

    # the stage and the CLI, in processes of their own (mlflow's lines go to their stdout)
    env = track_env(MLFLOW_TRACKING_URI=uri)
    make_result(tmp_path, ratio=0.7)
    for cmd in (["-m", "stages.track"], ["-m", "kdprune.tracking", "relog"], ["-m", "kdprune.tracking", "uri"]):
        r = subprocess.run([sys.executable, *cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert SECRET not in r.stdout + r.stderr and "kd-user:***@" in r.stdout, (cmd, r.stdout)
    assert len(runs(mlflow_server)) == 2


def test_password_is_redacted_when_the_server_is_unreachable(tmp_path, monkeypatch, capfd):
    make_result(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://kd-user:{SECRET}@127.0.0.1:9"  # the discard port: nothing listens
    with pytest.raises(tracking_store.TrackingError) as e:
        tracking_pipeline.log_pipeline(tmp_path, {"MLFLOW_TRACKING_URI": uri, tracking_store.WAIT_ENV: "0"})
    out = capfd.readouterr()
    assert "relog" in str(e.value) and "kd-user:***@127.0.0.1:9" in str(e.value)
    assert SECRET not in str(e.value) + out.out + out.err


def test_redact():
    assert tracking_store.redact("http://u:pw@h:5000/x and https://a:b%40c@d") == "http://u:***@h:5000/x and https://a:***@d"
    assert tracking_store.redact("http://u:p@ss@h/x") == "http://u:***@h/x"  # an unencoded @ in the password
    for plain in ("http://h:5000", "http://user@h:5000/x", "sqlite:////repo/mlflow.db"):
        assert tracking_store.redact(plain) == plain


def damage_store(db, damage: str) -> None:
    if damage == "garbage":
        db.write_bytes(b"this is not a database\x00\xff" * 100)
    elif damage == "truncated":  # SQLite's header, then garbage: sqlite says "file is not a database"
        db.write_bytes(db.read_bytes()[:100] + b"\xde\xad" * 2000)
    else:  # an SQLite database, but its schema is not one MLflow knows
        db.unlink()
        with sqlite3.connect(db) as con:
            con.execute("create table alembic_version (version_num varchar(32) not null)")
            con.execute("insert into alembic_version values ('not-a-revision')")


def test_garbage_local_store_is_a_user_error_not_an_outage(tmp_path):
    """A mlflow.db that is not a database: `track` exits 2 with one line naming the file and saying to move it
    aside, never "relog once reachable" (exit 3)."""
    make_result(tmp_path)
    db = tmp_path / "mlflow.db"
    damage_store(db, "garbage")
    before = db.read_bytes()
    r = subprocess.run([sys.executable, "-m", "stages.track"], cwd=tmp_path, env=track_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {db}: not an SQLite database") and "move it aside" in line.lower()
    assert "not an outage" in line and "reachable" not in line and "Traceback" not in r.stderr
    assert db.read_bytes() == before  # left as it was, for the user to inspect


@pytest.mark.parametrize("damage", ["truncated", "foreign_schema"])
def test_broken_local_store_is_a_user_error_not_an_outage(tmp_path, damage):
    """SQLite's header but a damaged file, or a schema MLflow cannot migrate: the same one line, not an outage."""
    make_result(tmp_path)
    db = tmp_path / "mlflow.db"
    damage_store(db, damage)
    with pytest.raises(tracking_store.TrackingUserError) as e:
        tracking_pipeline.log_pipeline(tmp_path, {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    msg = str(e.value)
    assert msg.startswith(f"{db}: its database or schema is broken (") and "move it aside" in msg.lower(), msg
    assert "not an outage" in msg and "reachable" not in msg and "\n" not in msg
