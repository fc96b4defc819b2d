"""Presets: each one validates against the pipeline's params, reaches the paper's compression, and
turns into one `dvc exp run` command."""
import subprocess
import sys

import pytest
import torch

from kdprune import presets
from kdprune.models import build_model, spec_from_params
from kdprune.params import PRUNE_METHODS
from kdprune.prune.counts import count_params, count_prunable, prunable_modules
from tests.helpers import committed_params_text

PAPER = {"cifar100-resnet152": (100, 3, 22.0), "svhn-resnet110": (10, 3, 49.0)}


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """The committed params.yaml in a temp file: presets apply to the defaults, not to a working edit."""
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(committed_params_text())
    return path


def test_the_three_presets_exist_and_validate(committed):
    assert {"cifar100-resnet152", "svhn-resnet110", "cifar10-resnet20"} <= set(presets.available())
    for name in presets.available():
        params, overrides = presets.resolve(name, committed)
        assert overrides and (params.data.name != "fashion_mnist" or name.startswith("study-"))
        assert params.prune.method in PRUNE_METHODS


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_reach_the_papers_compression(name, committed):
    classes, channels, target = PAPER[name]
    params, _ = presets.resolve(name, committed)
    with torch.device("meta"):  # counts only: no memory for 58M weights
        model = build_model(spec_from_params(params.model, channels, classes))
    total = numel(model.parameters())
    prunable = numel(m.weight for _, m in prunable_modules(model, params.prune.include_first_conv,
                                                           params.prune.include_last_fc))
    nonzero = total - round(params.prune.ratio * prunable)  # what global magnitude pruning keeps
    assert total / nonzero >= target, f"{name}: {total / nonzero:.1f}x < {target}x"
    if name == "cifar100-resnet152":
        assert params.model.depth == 152 and 58e6 < total < 59e6
    else:
        assert params.model.depth == 110 and params.data.name == "svhn"


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def test_counts_on_meta_match_real_counts(committed):
    params, _ = presets.resolve("cifar10-resnet20", committed)
    model = build_model(spec_from_params(params.model, 3, 10))
    assert numel(model.parameters()) == count_params(model)[0]
    assert numel(m.weight for _, m in prunable_modules(model)) == count_prunable(model)[0]


def test_command_has_one_override_per_key(committed):
    _, overrides = presets.resolve("svhn-resnet110", committed)
    cmd = presets.command("svhn-resnet110", overrides, queue=True)
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "svhn-resnet110"] and "--queue" in cmd
    assert "data.name='svhn'" in cmd and "model.depth=110" in cmd and "distill.variants=['kd','finetune']" in cmd
    assert cmd.count("-S") == len(overrides)


def test_cli_dry_run_and_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdprune.presets", "run", "cifar10-resnet20", "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "dvc exp run -n cifar10-resnet20" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kdprune.presets", "run", "cifar1000"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown preset 'cifar1000'" in r.stderr and "svhn-resnet110" in r.stderr


def test_options_before_the_double_dash_and_dvc_args_after_it(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # docs/experiments.md's order: NAME, the options, then -- and dvc exp run's arguments (argparse alone refused it)
    assert presets.main(["run", "study-fashion", "--queue", "--dry-run", "--", "-S", "seed=1", "--temp"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("dvc exp run -n study-fashion --queue -S ") and out.rstrip().endswith("-S seed=1 --temp")
    assert err == ""  # study-fashion leaves runtime.device alone: sized for the CPU, no GPU warning
    assert presets.main(["run", "cifar10-resnet20", "--dry-run", "--"]) == 0  # an empty tail
    out, err = capsys.readouterr()
    assert out.startswith("dvc exp run -n cifar10-resnet20 -S ") and " --" not in out and "meant for a GPU" in err
    with pytest.raises(SystemExit):
        presets.main(["show", "study-fashion", "--", "-S", "seed=1"])
    assert "show takes no dvc exp run arguments" in capsys.readouterr().err


def test_a_missing_dvc_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no dvc to start
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # and none beside the running Python
    assert presets.main(["run", "study-fashion", "--", "-S", "seed=1"]) == 127
    assert "error: dvc is not on PATH" in capsys.readouterr().err


def test_the_venvs_dvc_runs_when_the_venv_is_not_activated(tmp_path, monkeypatch, capsys):
    """Old: `.venv/bin/python -m kdprune.presets run NAME` without the venv on PATH said dvc was missing, though
    it lay beside that Python. The printed command stays plain `dvc ...`; the one found runs."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dvc").write_text('#!/bin/sh\necho "fake dvc $*" > "${0%/*}/ran"\n')  # builtins only: PATH is empty
    (fake / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # no dvc on PATH
    monkeypatch.setattr(sys, "executable", str(fake / "python"))
    assert presets.main(["run", "study-fashion", "--", "-S", "seed=1"]) == 0
    assert capsys.readouterr().out.startswith("dvc exp run -n study-fashion -S ")
    assert (fake / "ran").read_text().startswith("fake dvc exp run -n study-fashion -S ")


def test_an_invalid_preset_names_its_file_and_key(tmp_path, monkeypatch, committed):
    (tmp_path / "bad.yaml").write_text("description: x\nparams:\n  prune:\n    ratio: 1.5\n")
    monkeypatch.setattr(presets, "PRESETS", tmp_path)
    with pytest.raises(presets.PresetError, match=r"bad.yaml: params.yaml: prune.ratio = 1.5"):
        presets.resolve("bad", committed)
