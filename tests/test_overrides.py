"""Overrides reach DVC unchanged (kdprune/overrides.py).

Old: every kdprune command that calls `dvc exp run -S` wrote strings unquoted, so a string param from someone
else's preset, --set or study plan was read by Hydra: `a,b` and `range(0,1000)` became sweeps (DVC queued one
experiment per value), and `${oc.env:NAME}` became the value of an environment variable, written into
params.yaml, the experiment commit and MLflow. A `${...}` already in params.yaml is resolved by DVC on any -S.
"""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdprune import overrides as O
from kdprune import presets
from kdprune.experiments import args as exp_args
from kdprune.experiments import frontier as F
from kdprune.experiments import runs as exp_runs
from kdprune.experiments import study_plan

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["a,b", "range(0,1000)", "choice(x,y)", "shuffle(a,b)", "glob(*)", "interval(0,1)", "int(3)",
           "${oc.env:HOME}", "\\${x}", "\\\\${x}", "${", "it's", "'", "''", "\\", "x\\", "\\'", "a\\'b", '"q"',
           "null", "true", "1", "1e5", "nan", "[1,2]", "{a:1}", " lead", "trail ", "a b", "x:y", "k=v", "%$*@?|",
           "é漢字", "a\nb", "\t", ""]


def dvc_reads(sets: list[str], keys: list[str]) -> dict:
    """What DVC 3.67's `apply_overrides` writes for these -S strings (its own steps, in memory)."""
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from omegaconf import OmegaConf

    assert len(get_hydra_sweeps({"params.yaml": sets})) == 1, sets
    cfg = OmegaConf.create(O.nest(dict.fromkeys(keys)), flags={"allow_objects": True})
    OmegaConf.set_struct(cfg, True)
    ConfigLoaderImpl._apply_overrides_to_config(to_hydra_overrides(sets), cfg)
    written = OmegaConf.to_object(cfg)
    return {k: O._get(written, k) for k in keys}


@pytest.mark.parametrize("text", HOSTILE)
def test_every_hostile_string_is_read_back_exactly(text):
    assert dvc_reads([O.override("data.root", text)], ["data.root"]) == {"data.root": text}


def test_random_strings_round_trip():
    rng = random.Random(0)
    alphabet = list("\\$'\"{}[](),:=# a\t%*@?|~+-.")
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        assert dvc_reads([O.override("x.y", text)], ["x.y"]) == {"x.y": text}, repr(text)


@pytest.mark.parametrize("value", [0.1, 1e-05, -2, 0, 12345678901234567890, True, False, None, ["kd", "finetune"],
                                   [0.5, "a,b", None], []])
def test_other_values_round_trip_with_their_type(value):
    got = dvc_reads([O.override("x.y", value)], ["x.y"])["x.y"]
    assert got == value and type(got) is type(value)


def test_the_old_unquoted_form_was_a_sweep_and_a_leak():
    """The probe itself: what DVC made of the old `str(value)`."""
    from dvc.utils.hydra import get_hydra_sweeps

    assert len(get_hydra_sweeps({"params.yaml": ["mlflow.experiment=range(0,1000)"]})) == 1000
    assert len(get_hydra_sweeps({"params.yaml": ["data.root=a,b"]})) == 2
    assert dvc_reads(["data.root=${oc.env:HOME}"], ["data.root"]) == {"data.root": os.environ["HOME"]}
    assert len(get_hydra_sweeps({"params.yaml": [O.override("mlflow.experiment", "range(0,1000)")]})) == 1


def test_dvc_args_refuses_what_cannot_reach_dvc_unchanged():
    assert O.dvc_args({"data": {"root": "/x"}}, {"data.root": "a,b", "distill.epochs": 3}) == [
        "-S", "data.root='a,b'", "-S", "distill.epochs=3"]
    with pytest.raises(O.OverrideError, match=r"params.yaml: data.root contain"):
        O.dvc_args({"data": {"root": "${oc.env:AWS_SECRET_ACCESS_KEY}"}}, {"seed": 1})
    with pytest.raises(O.OverrideError, match=r"override: mlflow.experiment"):
        O.dvc_args({}, {"mlflow.experiment": "${oc.env:HOME}"})
    with pytest.raises(O.OverrideError, match="distill.lr = nan: not a finite number"):
        O.dvc_args({}, {"distill.lr": float("nan")})
    with pytest.raises(O.OverrideError, match="model.kwargs = .*a dict"):
        O.dvc_args({}, {"model.kwargs": {"a": 1}})
    with pytest.raises(O.OverrideError, match="data.root: a string of 5,000 characters"):
        O.dvc_args({}, {"data.root": "x" * 5000})
    with pytest.raises(O.OverrideError, match="prune.ratio: prune is not a section"):
        O.nest({"prune": 1, "prune.ratio": 0.9})


@pytest.mark.parametrize("kwargs", [{}, {"width": 8}, {"depth": 2}])
def test_a_model_kwargs_key_reaches_dvc_whether_or_not_params_yaml_has_it(tmp_path, kwargs):
    """DVC applies -S in OmegaConf's struct mode: `model.kwargs.width=16` (and `model.kwargs={width: 16}`) failed
    with "Could not override" when params.yaml's kwargs lacked the key; the sweep's and the frontier's --set
    write `++model.kwargs.width=16`, which adds the key or replaces it."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "custom", "kwargs": kwargs}, "seed": 0}))
    sets = O.dvc_args(yaml.safe_load(path.read_text()), dict([O.parse("model.kwargs.width=16"), O.parse("seed=3")]))
    assert sets == ["-S", "++model.kwargs.width=16", "-S", "seed=3"]
    apply_overrides(path, sets[1::2])  # what `dvc exp run -S ... -S ...` does to params.yaml
    assert yaml.safe_load(path.read_text()) == {"model": {"arch": "custom", "kwargs": {**kwargs, "width": 16}},
                                                "seed": 3}


@pytest.mark.parametrize("text", ["x", "=3", "a b=1", "~prune.ratio=0.5", "+new=1", "prune.ratio", "a..b=1",
                                  "data.root=[1", "seed=&a [1, *a]"])
def test_parse_refuses_malformed_overrides(text):
    with pytest.raises(O.OverrideError):
        O.parse(text)


def test_interpolations_are_found_anywhere():
    assert O.interpolations({"a": {"b": ["ok", "x${y}"]}, "c": "${z}", "d": 1}) == ["a.b[1]", "c"]


def test_real_dvc_queues_one_experiment_and_writes_the_values(tmp_path, venv_bin):
    """Through DVC itself: the hostile values queue exactly one experiment, and a run writes them unchanged (and no
    environment variable)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "KDPRUNE_TEST_SECRET": "s3cr3t", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*args):
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    keys = [f"k{i}" for i in range(8)]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(dict.fromkeys(keys, "x")))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {
        "cmd": "cp params.yaml out.yaml", "params": keys, "outs": ["out.yaml"]}}}))
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    values = dict(zip(keys, ["range(0,50)", "a,b", "${oc.env:KDPRUNE_TEST_SECRET}", "it's", "x\\", "\\${k0}",
                             "choice(p,q)", "[1,2]"]))
    sets = [a for k, v in values.items() for a in ("-S", O.override(k, v))]
    sh("dvc", "exp", "run", "--queue", *sets)
    assert sh("dvc", "queue", "status").count("Queued") == 1
    sh("dvc", "queue", "remove", "--all")
    sh("dvc", "exp", "run", *sets)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == values
    assert "s3cr3t" not in (tmp_path / "params.yaml").read_text()


def test_validate_stage_refuses_an_interpolation_in_params_yaml(tmp_path):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["mlflow"]["experiment"] = "${oc.env:HOME}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "stages.validate"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "mlflow.experiment" in r.stderr and "dvc exp run -S" in r.stderr, r.stderr
    assert not (tmp_path / "data" / "params.valid").exists()


def test_presets_quote_strings_and_refuse_interpolations(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESETS", tmp_path / "presets")
    (tmp_path / "presets").mkdir()
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "presets" / "sweepy.yaml").write_text(
        "description: x\nparams:\n  mlflow:\n    experiment: 'range(0,1000)'\n")
    _, ovr = presets.resolve("sweepy", tmp_path / "params.yaml")
    cmd = presets.command("sweepy", ovr, queue=True)
    assert "mlflow.experiment='range(0,1000)'" in cmd
    (tmp_path / "presets" / "leaky.yaml").write_text(
        "description: x\nparams:\n  data:\n    root: '${oc.env:HOME}'\n")
    with pytest.raises(presets.PresetError, match=r"leaky.yaml: data.root contain"):
        presets.resolve("leaky", tmp_path / "params.yaml")
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad["data"]["root"] = "${oc.env:HOME}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(presets.PresetError, match=r"params.yaml: data.root contain"):
        presets.resolve("sweepy", tmp_path / "params.yaml")


def test_sweep_checks_its_overrides_before_queueing(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    experiment, extra = exp_args.check_sets(["distill.epochs=3", "mlflow.experiment=a,b"], params)
    assert extra == ["-S", "distill.epochs=3", "-S", "mlflow.experiment='a,b'"] and experiment == "a,b"
    for sets, needle in [(["prune.ratio=0.5"], "prune.ratio: the sweep sets it"),
                         (["distill.epochs=abc"], "distill.epochs"),
                         (["no_such.key=1"], "no_such"),
                         (["distill.epochs"], "use key=value"),
                         (["data.root=${oc.env:HOME}"], "data.root"),
                         (["x=1"] * 65, "at most 64")]:
        with pytest.raises(SystemExit) as e:
            exp_args.check_sets(sets, params)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1, err


def test_frontier_and_study_refuse_interpolations(tmp_path, monkeypatch):
    with pytest.raises(exp_runs.FrontierError, match="data.root"):
        exp_args.parse_sets(["data.root=${oc.env:HOME}"])
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad["data"]["root"] = "${oc.env:HOME}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(exp_runs.FrontierError, match="params.yaml: data.root contain"):
        F.target_params(tmp_path / "params.yaml", {}, ["kd"])
    with pytest.raises(study_plan.StudyError, match="params.yaml: data.root contain"):
        study_plan.load_plan("study-fashion", tmp_path / "params.yaml")
