"""Your own model through DVC (issue 27): editing the factory's module reruns the stages that build the model, and
a --temp experiment refuses, in one line, a module that git does not have."""
import hashlib
import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.pipeline.test_e2e import ROOT, dvc, git, make_repo

MODULE = "mynets/tiny.py"


def custom_repo(tmp_path, venv_bin, commit_module: bool = True):
    repo, env = make_repo(tmp_path, venv_bin)
    (repo / "mynets").mkdir()
    shutil.copy(ROOT / "tests" / "custom_models.py", repo / MODULE)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["model"].update(arch="custom", factory="mynets.tiny:tiny_net", kwargs={"width": 4}, depth=8, width=16)
    p["teacher"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    git(repo, env, "add", "params.yaml", *([MODULE] if commit_module else []))
    git(repo, env, "commit", "-qm", "my model")
    return repo, env


def ran(out: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", out)


def test_editing_the_custom_module_reruns_the_stages_that_build_the_model(tmp_path, venv_bin):
    repo, env = custom_repo(tmp_path, venv_bin)
    out = dvc(repo, env, "repro", "train_teacher")
    assert ran(out) == ["validate", "prepare", "train_teacher"]
    code = (repo / "data" / "model_code.sha256").read_text()
    assert code == f"{hashlib.sha256((repo / MODULE).read_bytes()).hexdigest()}  {MODULE}\n"
    git(repo, env, "add", "dvc.lock")
    git(repo, env, "commit", "-qm", "teacher")
    assert ran(dvc(repo, env, "repro", "train_teacher")) == ["validate"]  # nothing changed: only the check runs
    status = json.loads(dvc(repo, env, "status", "--json"))
    assert status["validate"] == ["always changed"] and "prepare" not in status and "train_teacher" not in status

    text = (repo / MODULE).read_text()
    assert text.count("nn.ReLU()") == 3
    (repo / MODULE).write_text(text.replace("nn.ReLU()", "nn.GELU()"))
    out = dvc(repo, env, "repro", "train_teacher")
    assert ran(out) == ["validate", "train_teacher"], out[-3000:]  # the data does not depend on the model
    assert (repo / "data" / "model_code.sha256").read_text() != code
    assert "train_teacher" not in json.loads(dvc(repo, env, "status", "--json"))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train_teacher"]
    assert "data/model_code.sha256" in {d["path"] for d in lock["deps"]}


@pytest.mark.slow  # ~1 min on 2 cores: a real --temp experiment; test_custom_factory.py checks validate's side of it
def test_a_temp_experiment_refuses_a_module_git_does_not_have(tmp_path, venv_bin):
    repo, env = custom_repo(tmp_path, venv_bin, commit_module=False)
    r = dvc_fails(repo, env, "exp", "run", "--temp", "train_teacher")
    assert ("model.factory = 'mynets.tiny:tiny_net' is invalid: its module mynets.tiny: mynets/tiny.py is not "
            "committed in git, and a queued or --temp experiment runs in a copy of the repository that holds only "
            "committed files: run `git add mynets/tiny.py && git commit`") in r, r[-3000:]
    assert "Running stage 'train_teacher'" not in r and "Traceback" not in r
    git(repo, env, "add", MODULE)
    git(repo, env, "commit", "-qm", "the module")
    out = dvc(repo, env, "exp", "run", "--temp", "train_teacher")  # committed: it runs
    assert "Running stage 'train_teacher'" in out


def dvc_fails(repo, env, *args) -> str:
    r = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr
