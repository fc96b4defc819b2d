"""Issue #13's probes against params, training and pruning: each reproduces what a hostile or careless
user tried, and fails without its fix (old behaviour in each docstring)."""
import copy
import hashlib
import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdprune import checkpoint, stage
from kdprune.data import TensorLoader
from kdprune.models import build_model, resnet_spec
from kdprune.params import (MAX_PARAMS_BYTES, DistillParams, ParamsError, RuntimeParams, TrainParams, load_params,
                            max_threads, params_from_dict)
from kdprune.prune.filters import l1_filter_prune
from kdprune.prune.masks import global_magnitude_masks, PruningError
from kdprune.train.loop import fit, TrainingDiverged
from tests.helpers import params_with, committed_params_text, default_params, write_fake_dataset

BASE = default_params()


def with_value(dotted: str, value) -> dict:
    return params_with(dotted, value, BASE)


# --- unbounded params (old: accepted, then a segfault, a stalled machine, a traceback or NaN) ---------------

@pytest.mark.parametrize("key,value,needle", [
    ("runtime.threads", 100_000, "at most 4x this machine's"),  # old: segfault
    ("runtime.threads", 5_000, "at most 4x this machine's"),  # old: 10,000 threads, machine stalled
    ("seed", 2**32, "numpy's seed range"),  # old: traceback from np.random.seed
    ("seed", 10**30, "numpy's seed range"),
    ("model.depth", 9998, "at most 1202"),  # old: accepted
    ("model.depth", 600000002, "at most 1202"),
    ("distill.temperature", 1e-300, "[0.1, 100.0]"),  # old: NaN, then a misleading "masks leaked"
    ("distill.temperature", 1e6, "[0.1, 100.0]"),
    ("teacher.lr", 1.0e30, "(0, 10.0]"),  # old: loss nan, exit 0
    ("distill.lr", 11.0, "(0, 10.0]"),
    ("teacher.weight_decay", math.inf, "finite number"),  # old: loss nan, exit 0
    ("teacher.weight_decay", math.nan, "finite number"),
    ("teacher.weight_decay", 0.5, "[0, 0.1]"),
    ("distill.at_beta", 1e300, "[0, 100000]"),
    ("teacher.epochs", 10**9, "[1, 10000]"),
    ("distill.batch_size", 10**9, "[1, 65536]"),
    ("evaluate.batch_size", 10**9, "[1, 65536]"),
    ("evaluate.latency_repeats", 10**9, "[0, 10000]"),
    ("data.train_subset", 10**12, "[0, 100,000,000]"),
    ("prune.agp_steps", 10**9, "[1, 10000]"),
    ("teacher.lr", 10**400, "finite number"),  # an int too large for a float
    ("mlflow.experiment", "x" * 1000, "at most 200 printable"),
    ("mlflow.experiment", "a\nb", "printable"),
    ("data.root", "a\x00b", "NUL"),
])
def test_every_number_and_size_is_bounded(key, value, needle):
    with pytest.raises(ParamsError, match=None) as e:
        params_from_dict(with_value(key, value))
    assert key in str(e.value) and needle in str(e.value), str(e.value)
    assert len(str(e.value)) < 600  # the value is shown bounded


def test_threads_bound_follows_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert max_threads() == 8
    RuntimeParams(threads=8).validate("runtime")
    with pytest.raises(ParamsError, match=r"runtime.threads = 9 is invalid: must be in \[0, 8\]"):
        RuntimeParams(threads=9).validate("runtime")


def test_nan_comparisons_fail_closed():
    """NaN compares False with everything, so `x < lo` style checks let it through; the bounds must not."""
    for cfg in (TrainParams(lr=math.nan), TrainParams(momentum=math.nan), TrainParams(warmup_frac=math.nan),
                DistillParams(alpha=math.nan), DistillParams(temperature=math.nan)):
        with pytest.raises(ParamsError):
            cfg.validate("x")


# --- YAML: hand-typed floats, alias bombs, huge files and values ---------------------------------------------

def write_params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_hand_typed_exponent_float_is_a_number(tmp_path):
    """Old: `teacher.lr: 1e-3` was refused as 'must be a number' (PyYAML reads YAML 1.1: 1e-3 is a string)."""
    text = committed_params_text()
    assert "  lr: 0.4" in text
    p = load_params(write_params(tmp_path, text.replace("  lr: 0.4", "  lr: 1e-3", 1)))
    assert p.teacher.lr == 0.001
    p = load_params(write_params(tmp_path, text.replace("  weight_decay: 0.0005", "  weight_decay: 5E-4", 1)))
    assert p.teacher.weight_decay == 0.0005
    with pytest.raises(ParamsError, match="teacher.epochs = 1000.0 is invalid: must be an integer"):
        load_params(write_params(tmp_path, text.replace("  epochs: 6", "  epochs: 1e3", 1)))


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    """Old: a 4.5 KB params.yaml exhausted memory while the error message was formatted."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    lines += ["data:", "  root: *a11"]
    path = write_params(tmp_path, "\n".join(lines) + "\n")
    assert path.stat().st_size < 5000
    t0 = time.monotonic()
    with pytest.raises(ParamsError, match="aliases .* are not allowed") as e:
        load_params(path)
    assert time.monotonic() - t0 < 5 and len(str(e.value)) < 1000


def test_huge_params_file_is_refused(tmp_path):
    path = write_params(tmp_path, "# " + "x" * MAX_PARAMS_BYTES + "\n")
    with pytest.raises(ParamsError, match="a params file is at most"):
        load_params(path)


def test_huge_value_is_shown_bounded(tmp_path):
    raw = with_value("data.root", ["x" * 10**6] * 100)  # the wrong type, and huge
    with pytest.raises(ParamsError, match="data.root") as e:
        params_from_dict(raw)
    assert len(str(e.value)) < 600
    raw = with_value("prune", {"x" * 10**6: 1})  # a huge unknown key
    with pytest.raises(ParamsError, match="unknown key") as e:
        params_from_dict(raw)
    assert len(str(e.value)) < 1000


# --- divergence: a non-finite loss stops training, names the params, writes nothing -----------------------

def tiny_loader(n=64, constant=False):
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 1, 12, 12), 7, dtype=torch.uint8) if constant else torch.randint(0, 255, (n, 1, 12, 12),
                                                                                         generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    return TensorLoader(x, y, [0.5], [0.25], 16, train=True, crop_padding=0, hflip=False, seed=0)


def test_fit_stops_on_a_non_finite_loss_without_a_resume_checkpoint(tmp_path):
    """Old: the teacher trained to `loss nan` and 10 % accuracy, exit 0, and every later stage went on."""
    model = build_model(resnet_spec(8, 4, 1, 10))
    cfg = TrainParams(epochs=3, batch_size=16, lr=1e30, weight_decay=0.0, eval_every=0, checkpoint_every=1)
    ckpt = tmp_path / "teacher.pt"
    with pytest.raises(TrainingDiverged) as e:
        fit(model, tiny_loader(), tiny_loader(), cfg, runtime=RuntimeParams(), name="teacher", log=lambda m: None,
            checkpoint=ckpt)
    msg = str(e.value)
    assert "teacher: training diverged at epoch 1" in msg and "teacher.lr = 1e+30" in msg and "\n" not in msg
    assert not ckpt.exists()


def test_a_diverging_stage_exits_2_and_writes_no_outputs(tmp_path, monkeypatch, capsys):
    """The same through the stage: one line, exit 2, none of the stage's outputs."""
    import stages.prepare
    import stages.train_teacher
    from kdprune.train import loop

    raw = write_fake_dataset(tmp_path / "raw", n_train=60, n_test=20)
    p = copy.deepcopy(BASE)
    p["data"].update(root=str(raw), download=False)
    p["model"].update(depth=8, width=4)
    p["teacher"].update(epochs=2, batch_size=32)
    p["runtime"]["threads"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    stage.run(stages.prepare.main)
    real = loop.kd_loss
    monkeypatch.setattr(loop, "kd_loss", lambda *a, **k: real(*a, **k) * math.nan)  # what lr 1e30 led to
    with pytest.raises(SystemExit) as e:
        stage.run(stages.train_teacher.main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: teacher: training diverged at epoch 1") and "\n" not in err
    assert not (tmp_path / stage.TEACHER).exists() and not (tmp_path / "metrics" / "teacher.json").exists()
    assert not (tmp_path / "checkpoints" / "teacher.pt").exists()


# --- pruning refuses non-finite weights (old: '1.00x compression at ratio 0.8') ---------------------------

def nan_model():
    model = build_model(resnet_spec(8, 4, 1, 10))
    with torch.no_grad():
        model.fc.weight[0, 0] = math.nan
        model.conv1.weight.fill_(math.inf)
    return model


def test_pruning_refuses_non_finite_weights():
    with pytest.raises(PruningError, match=r"NaN or infinite weights in conv1.weight \(\d+ values\)"):
        global_magnitude_masks(nan_model(), 0.8)
    with pytest.raises(PruningError, match="diverged"):
        l1_filter_prune(nan_model(), 0.5, torch.zeros(1, 1, 12, 12))


def test_prune_stage_refuses_a_diverged_teacher(tmp_path, monkeypatch, capsys):
    import stages.prepare
    import stages.prune

    raw = write_fake_dataset(tmp_path / "raw", n_train=40, n_test=20)
    p = copy.deepcopy(BASE)
    p["data"].update(root=str(raw), download=False)
    p["model"].update(depth=8, width=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    monkeypatch.chdir(tmp_path)
    stage.run(stages.prepare.main)
    model = build_model(resnet_spec(8, 4, 1, 10))
    with torch.no_grad():
        model.layer1[0].conv1.weight[0] = math.nan
    checkpoint.save_checkpoint(tmp_path / stage.TEACHER, model, meta={"dataset": "fashion_mnist", "input_shape": [1, 28, 28]})
    with pytest.raises(SystemExit) as e:
        stage.run(stages.prune.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "models/teacher.pt has NaN or infinite weights" in err
    assert not (tmp_path / stage.PRUNED).exists()


# --- tests start from the committed params, not the working file -------------------------------------------

def test_tests_read_the_committed_params_not_a_working_edit(tmp_path):
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin"}
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    for args in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True, capture_output=True)
    (tmp_path / "params.yaml").write_text("seed: [unclosed\n")  # a user mid-edit
    assert committed_params_text(tmp_path) == "seed: 0\n"
    assert default_params(tmp_path) == {"seed": 0}


# --- the pipeline through DVC: no param reaches a shell; a failed experiment keeps the workspace -----------

def output_digests(repo: Path) -> dict[str, str]:
    out = {}
    for d in ("data", "models", "metrics", "plots"):
        for f in sorted((repo / d).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(repo))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_shell_payload_in_a_param_never_runs_and_failed_experiments_keep_outputs(tmp_path, venv_bin):
    """Old: `dvc exp run -S "distill.variants=['kd$(touch /tmp/x)']"` ran the touch whenever prepare, teacher and
    prune were cached (DVC pasted ${item} into the distill command); and `dvc exp run -S prune.ratio=1.2` deleted
    models/pruned.pt, metrics/*.json and plots/*.csv before the prune stage refused the value."""
    from tests.pipeline.test_e2e import dvc, git, make_repo

    repo, env = make_repo(tmp_path, venv_bin)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["mlflow"]["enabled"] = False
    p["evaluate"].update(latency_repeats=0, onnx=False)
    p["quantize"]["method"] = "none"  # INT8 is made from the ONNX export
    p["teacher"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    dvc(repo, env, "repro")
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-qm", "baseline")
    before = output_digests(repo)
    assert {"models/pruned.pt", "metrics/evaluate.json", "plots/teacher.csv", "models/students/kd.pt",
            "data/params.valid"} <= set(before)
    marker = tmp_path / "pwned"

    def fails(*args: str) -> str:
        r = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out[-3000:]
        assert not marker.exists(), f"the payload ran: {out[-3000:]}"
        assert output_digests(repo) == before, "a failed run changed or deleted outputs"
        # not `git checkout -- params.yaml`: after a failed `dvc exp run`, DVC leaves git's index holding the
        # edited file's size and mtime, so git sees no change and checks nothing out (docs/reliability.md)
        (repo / "params.yaml").write_text(committed)
        return out

    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=repo, env=env, capture_output=True,
                               text=True, check=True).stdout

    payload = f"kd$(touch {marker})"
    out = fails("exp", "run", "-S", f"distill.variants=['{payload}']")
    assert "distill.variants" in out and "Running stage 'distill'" not in out
    bad = yaml.safe_load((repo / "params.yaml").read_text())
    bad["distill"]["variants"] = [payload, f"`touch {marker}`"]
    (repo / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    out = fails("repro")
    assert "distill.variants" in out
    out = fails("exp", "run", "-S", "prune.ratio=1.2")
    assert "params.yaml: prune.ratio = 1.2 is invalid" in out and "Running stage 'prune'" not in out
    # the workspace is as it was: nothing to rerun (validate and track run every time: dvc.yaml, always_changed)
    assert json.loads(dvc(repo, env, "status", "--json")) == {"validate": ["always changed"], "track": ["always changed"]}


def test_narrow_models_stay_nchw_on_the_cpu():
    """torch 2.14.1's oneDNN fp32 channels-last backward aborted the process (double free) for ResNet-8 widths 2-7
    on this CPU; such models now keep NCHW weights, wider ones still go channels-last."""
    from kdprune.train.runtime import nhwc_safe, to_runtime

    rt = RuntimeParams(channels_last=True)
    narrow, wide = build_model(resnet_spec(8, 4, 1, 10)), build_model(resnet_spec(8, 8, 1, 10))
    assert not nhwc_safe(narrow) and nhwc_safe(wide)
    assert to_runtime(narrow, rt).conv1.weight.is_contiguous()  # NCHW
    assert to_runtime(wide, rt).layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
