"""Compress your own model, what a newcomer and a hostile params file hit (issue 27): the factory must be a file of
the repository (found without importing it), wrong logits and broken factories are one line, the module's hash
feeds the stages that build the model, uncommitted files are refused in DVC's experiment copies, and a teacher
that does not generalise gets a warning."""
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from kdprune import workspace
from kdprune.models import build_model
from kdprune.models.custom import FactoryError
from kdprune.params import ParamsError, params_from_dict
from kdprune.teacher import TeacherError, accuracy_warning, check_runs, model_source
from tests.custom_models import TinyNet
from tests.helpers import ROOT, default_params, write_fake_dataset

TINY = (ROOT / "tests" / "custom_models.py").read_text()


def custom(factory: str, **model) -> dict:
    raw = default_params()
    raw["model"] = {"arch": "custom", "factory": factory, **model}
    return raw


# --- item 1: the logits must be one per class ---------------------------------------------------------------------

def test_a_model_with_the_wrong_number_of_logits_is_refused_at_its_first_forward():
    params = params_from_dict(custom("tests.custom_models:tiny_net"))
    with pytest.raises(TeacherError) as e:
        check_runs(TinyNet(13, 1, 4), (1, 28, 28), "custom tests.custom_models:tiny_net", 10, model_source(params.model))
    assert str(e.value) == ("model.factory tests.custom_models:tiny_net returns 13 logits per image but the data has "
                            "10 classes")
    tv = build_model({"arch": "torchvision", "name": "resnet18", "num_classes": 7, "in_channels": 3})
    raw = default_params()
    raw["model"] = {"arch": "torchvision", "name": "resnet18"}
    with pytest.raises(TeacherError, match="^model.name resnet18 returns 7 logits per image but the data has 10 "):
        check_runs(tv, (3, 32, 32), "torchvision resnet18", 10, model_source(params_from_dict(raw).model))
    check_runs(TinyNet(10, 1, 4), (1, 28, 28), "custom", 10)  # the right width passes


# --- item 2: the factory is a file of the repository, found without importing it ------------------------------------

@pytest.mark.parametrize("factory, needle", [
    ("torch.hub:load", "torch/hub.py, not a .py file of the repository"),
    ("os:system", "its module os is frozen"),
    ("sys:exit", "its module sys is built-in"),
    ("math:sqrt", "its module math is compiled"),
    ("json:loads", "json/__init__.py, not a .py file of the repository"),
])
def test_a_factory_outside_the_repository_needs_the_opt_in(factory, needle):
    with pytest.raises(ParamsError) as e:
        params_from_dict(custom(factory))
    msg = str(e.value)
    assert msg.startswith(f"params.yaml: model.factory = '{factory}' is invalid: ") and needle in msg, msg
    assert "model.allow_external_factory: true" in msg and "\n" not in msg
    assert params_from_dict(custom(factory, allow_external_factory=True)).model.allow_external_factory is True


def test_allow_external_factory_is_a_bounded_boolean_of_custom_models_only():
    with pytest.raises(ParamsError, match="model.allow_external_factory = 'yes' is invalid: must be true or false"):
        params_from_dict(custom("torch.hub:load", allow_external_factory="yes"))
    raw = default_params()
    raw["model"]["allow_external_factory"] = True
    with pytest.raises(ParamsError, match="model.allow_external_factory = True is invalid: applies to model.arch: "
                                          "custom only"):
        params_from_dict(raw)
    assert params_from_dict(default_params()).model.allow_external_factory is False


def test_a_missing_module_names_the_file_it_should_be():
    with pytest.raises(ParamsError, match=r"no module mynets\.absent is importable from the repository root .*"
                                          r"\(mynets/absent\.py for mynets\.absent\)"):
        params_from_dict(custom("mynets.absent:build"))


def run_py(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DVC_")}, "PYTHONPATH": "", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_resolving_the_factory_imports_nothing_and_a_module_outside_the_repository_is_refused(tmp_path):
    """find_spec("pkg.mod") would import pkg: the module's package and the module itself must not run, a module of
    a sys.path entry outside the repository is refused like an installed one, and validate stays torch-free."""
    repo, outside = tmp_path / "repo", tmp_path / "elsewhere"
    for d in (repo / "mynets", outside / "theirs"):
        d.mkdir(parents=True)
    marker = tmp_path / "ran"
    for pkg in (repo / "mynets", outside / "theirs"):
        (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('{pkg.name} package ran\\n')\n")
        (pkg / "net.py").write_text(f"open({str(marker)!r}, 'a').write('{pkg.name} module ran\\n')\nimport torch\n")
    shutil.copytree(ROOT / "kdprune", repo / "kdprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    p = custom("mynets.net:build")
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    code = textwrap.dedent(f"""
        import sys
        sys.path.append({str(outside)!r})
        from kdprune.params import ParamsError, load_params
        assert load_params().model.factory == "mynets.net:build"
        try:
            from kdprune.params import params_from_dict
            import yaml
            raw = yaml.safe_load(open("params.yaml"))
            raw["model"]["factory"] = "theirs.net:build"
            params_from_dict(raw)
            raise SystemExit("theirs.net was accepted")
        except ParamsError as e:
            assert "theirs/net.py, not a .py file of the repository" in str(e), e
        import runpy
        sys.argv = ["validate"]
        try:
            runpy.run_module("stages.validate", run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        assert "torch" not in sys.modules and "mynets" not in sys.modules and "theirs" not in sys.modules
    """)
    r = run_py(code, repo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not marker.exists(), marker.read_text()
    want = hashlib.sha256((repo / "mynets" / "net.py").read_bytes()).hexdigest()
    assert (repo / "data" / "model_code.sha256").read_text() == f"{want}  mynets/net.py\n"
    assert (repo / "data" / "params.valid").exists()
    # any other arch: "none"
    (repo / "params.yaml").write_text(yaml.safe_dump(default_params(), sort_keys=False))
    r = run_py("import runpy, sys; sys.argv = ['validate']; runpy.run_module('stages.validate', run_name='__main__')",
               repo)
    assert r.returncode == 0, r.stderr
    assert (repo / "data" / "model_code.sha256").read_text() == "none\n"


# --- item 4: uncommitted files in DVC's experiment copies -----------------------------------------------------------

def test_an_experiment_copy_is_recognised_from_its_directory_or_dvc_root(tmp_path):
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "standalone" / "tmpab12"
    copy.mkdir(parents=True)
    assert workspace.in_experiment_copy(copy, {})
    assert workspace.in_experiment_copy(tmp_path, {"DVC_EXP_NAME": "x", "DVC_ROOT": str(tmp_path / "main")})
    assert not workspace.in_experiment_copy(tmp_path, {"DVC_EXP_NAME": "x", "DVC_ROOT": str(tmp_path)})  # in place
    assert not workspace.in_experiment_copy(tmp_path, {"DVC_ROOT": str(tmp_path / "main")})  # a plain repro
    assert not workspace.in_experiment_copy(tmp_path, {})


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, timeout=60)


def test_git_tracks_takes_the_path_literally(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "teachers").mkdir()
    for name in ("a b.pt", "x.pt", "big.pt.dvc", "*.pt"):
        (tmp_path / "teachers" / name).write_text("x")
    git(tmp_path, "add", "teachers/a b.pt", "teachers/big.pt.dvc")
    assert workspace.git_tracks("teachers/a b.pt", tmp_path) is True
    assert workspace.git_tracks("teachers/big.pt", tmp_path) is True  # DVC restores it from its .dvc file
    assert workspace.git_tracks("teachers/x.pt", tmp_path) is False
    assert workspace.git_tracks("teachers/*.pt", tmp_path) is False  # not a glob: the file '*.pt' is untracked
    assert workspace.git_tracks("teachers/x.pt", tmp_path.parent / "nowhere") is None


def test_validate_refuses_uncommitted_files_in_an_experiment_copy_only(tmp_path):
    repo = tmp_path / "repo"
    (repo / "mynets").mkdir(parents=True)
    for item in ("kdprune", "stages", "teachers"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "mynets" / "tiny.py").write_text(TINY)
    (repo / "teachers" / "mine.pt").write_bytes(b"weights")
    p = custom("mynets.tiny:tiny_net")
    p["teacher"].update(init="checkpoint", checkpoint="teachers/mine.pt", epochs=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    git(repo, "init", "-q")
    git(repo, "add", "kdprune", "stages", "params.yaml")
    git(repo, "commit", "-qm", "code")
    validate = "import runpy, sys; sys.argv = ['validate']; runpy.run_module('stages.validate', run_name='__main__')"
    copy_env = {"DVC_EXP_NAME": "e", "DVC_ROOT": str(tmp_path / "main")}  # a --temp run: DVC_ROOT is elsewhere
    assert run_py(validate, repo).returncode == 0  # in place: the files are there, uncommitted or not
    r = run_py(validate, repo, copy_env)
    assert r.returncode == 2 and r.stderr == (
        "error: teacher.checkpoint: teachers/mine.pt is not committed in git, and a queued or --temp experiment runs "
        "in a copy of the repository that holds only committed files: run `git add teachers/mine.pt && git "
        "commit`\n"), r.stderr
    git(repo, "add", "teachers/mine.pt")
    git(repo, "commit", "-qm", "teacher")
    r = run_py(validate, repo, copy_env)
    assert r.returncode == 2 and r.stderr == (
        "error: model.factory mynets.tiny:tiny_net: mynets/tiny.py is not committed in git, and a queued or --temp "
        "experiment runs in a copy of the repository that holds only committed files: run `git add mynets/tiny.py "
        "&& git commit`\n"), r.stderr
    git(repo, "add", "mynets/tiny.py")
    git(repo, "commit", "-qm", "model")
    assert run_py(validate, repo, copy_env).returncode == 0
    # in the copy DVC makes, an uncommitted module is not there at all: the message still names the file to commit
    shutil.rmtree(repo / "mynets")
    r = run_py(validate, repo, copy_env)
    assert r.returncode == 2 and "its module mynets.tiny: mynets/tiny.py is not committed in git" in r.stderr
    assert "git add mynets/tiny.py && git commit" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# --- item 7: a teacher that does not generalise ---------------------------------------------------------------------

def test_a_teacher_far_below_its_train_accuracy_or_near_chance_gets_a_warning():
    mnv3 = [{"epoch": 1, "train_acc": 60.0, "test_acc": 12.0}, {"epoch": 12, "train_acc": 98.75, "test_acc": 16.90}]
    w = accuracy_warning(mnv3, 10)
    assert w.startswith("warning: the teacher's test accuracy 16.90 % is far below its train accuracy 98.75 % "
                        "(81.8 points) and near chance (10.0 % for 10 classes)") and "\n" not in w
    assert "teacher.epochs" in w and "teacher.lr" in w and "data.image_size" in w and "another model" in w
    assert "far below" in accuracy_warning([{"train_acc": 99.0, "test_acc": 60.0}], 10)
    assert "near chance" in accuracy_warning([{"epoch": 0, "test_acc": 11.0}], 10)  # teacher.epochs 0: measured only
    assert accuracy_warning([{"train_acc": 99.0, "test_acc": 91.0}], 10) is None
    assert accuracy_warning([{"train_acc": 80.0, "test_acc": 55.0}], 100) is None  # a 25-point gap, far above chance
    assert accuracy_warning([{"train_acc": 99.0, "test_acc": float("nan")}], 10) is None
    assert accuracy_warning([], 10) is None


# --- items 1, 7, 8: the train_teacher stage, one line each ----------------------------------------------------------

BROKEN = '''
import torch.nn as nn
from mynets.tiny import TinyNet


def thirteen(num_classes, in_channels=3):
    return TinyNet(13, in_channels, 4)


def raises(num_classes, in_channels=3):
    raise RuntimeError("the user's factory broke")


def not_a_module(num_classes, in_channels=3):
    return "a string"
'''


@pytest.fixture(scope="module")
def stage_repo(tmp_path_factory):
    """A repository with kdprune, the user's mynets/ and the prepared tiny data."""
    tmp = tmp_path_factory.mktemp("custom_stage")
    repo = tmp / "repo"
    for item in ("kdprune", "stages", "teachers"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "mynets").mkdir()
    (repo / "mynets" / "tiny.py").write_text(TINY)
    (repo / "mynets" / "broken.py").write_text(BROKEN)
    p = custom("mynets.tiny:tiny_net", kwargs={"width": 4})
    p["data"].update(root=str(write_fake_dataset(tmp / "raw", n_train=200, n_test=100)), download=False)
    p["runtime"].update(threads=1, bf16=False)
    p["teacher"].update(epochs=1, batch_size=50)
    p["mlflow"]["enabled"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert stage(repo, "prepare", p).returncode == 0
    return repo, p


def stage(repo: Path, name: str, p: dict) -> subprocess.CompletedProcess:
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(CI="true", OMP_NUM_THREADS="1", PYTHONPATH="")
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("factory, kwargs, external, want", [
    ("mynets.broken:thirteen", {}, False,
     "error: model.factory mynets.broken:thirteen returns 13 logits per image but the data has 10 classes"),
    ("os:system", {}, True, "error: model.factory 'os:system' is not a model builder: it takes (command), and "
                            "kdprune calls it as system(num_classes=10)"),
    ("mynets.broken:raises", {}, False, "error: model.factory 'mynets.broken:raises' raised RuntimeError: the user's "
                                        "factory broke when called as raises(num_classes=10, in_channels=1)"),
    ("mynets.tiny:tiny_net", {"widht": 4}, False,
     "error: model.factory 'mynets.tiny:tiny_net' cannot be called as tiny_net(num_classes=10, in_channels=1, "
     "widht=4): got an unexpected keyword argument 'widht'"),
    ("mynets.broken:not_a_module", {}, False,
     "error: model.factory 'mynets.broken:not_a_module' returned str, not a torch.nn.Module"),
])
def test_a_broken_factory_stops_train_teacher_with_one_line(stage_repo, factory, kwargs, external, want):
    repo, p = stage_repo
    p = {**p, "model": {"arch": "custom", "factory": factory, "kwargs": kwargs, "allow_external_factory": external}}
    r = stage(repo, "train_teacher", p)
    assert r.returncode == 2 and r.stderr.startswith(want) and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout and not (repo / "models" / "teacher.pt").exists()


def test_os_system_without_the_opt_in_is_refused_before_any_import(stage_repo):
    repo, p = stage_repo
    r = stage(repo, "validate", {**p, "model": {"arch": "custom", "factory": "os:system"}})
    assert r.returncode == 2 and r.stderr.startswith("error: params.yaml: model.factory = 'os:system' is invalid: ")
    assert "model.allow_external_factory: true" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_teacher_that_does_not_generalise_is_trained_with_a_warning(stage_repo, monkeypatch):
    """The stage prints the warning and still writes its outputs (teacher.lr 1e-6: it learns nothing, near chance)."""
    repo, p = stage_repo
    p = {**p, "teacher": {**p["teacher"], "lr": 1e-6}}
    r = stage(repo, "train_teacher", p)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "near chance (10.0 % for 10 classes)" in lines[0], r.stderr[-3000:]
    assert (repo / "models" / "teacher.pt").exists()


def test_factory_errors_are_one_line_user_errors():
    spec = {"arch": "custom", "factory": "tests.custom_models:tiny_net", "kwargs": {"depth": 3}, "num_classes": 3,
            "in_channels": 3}
    with pytest.raises(FactoryError, match=r"^model.factory 'tests.custom_models:tiny_net' cannot be called as "
                                           r"tiny_net\(num_classes=3, in_channels=3, depth=3\): got an unexpected"):
        build_model(spec, allowed_factory="tests.custom_models:tiny_net")
