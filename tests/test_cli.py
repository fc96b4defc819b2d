"""The command line (issue #14): --help everywhere, the `python -m kdprune` dispatcher, run.sh's usage
and apt lock handling, the venv check, the device line, progress lines without a terminal, and
the preset CPU warning."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdprune.__main__ as cli
import kdprune.tracking.__main__ as tracking_cli
from kdprune import envcheck, presets
from kdprune.train import loop, runtime
from kdprune.params import RuntimeParams, TrainParams
from tests.helpers import ROOT

STAGES = sorted(f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
TOOLS = ["kdprune", "kdprune.sweep", "kdprune.report", "kdprune.presets", "kdprune.tracking", "kdprune.runcache"]


def env(**extra):
    e = dict(os.environ, PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    e.update(extra)
    return e


@pytest.mark.parametrize("module", STAGES + TOOLS)
def test_help_prints_usage_exits_0_and_does_no_work(module, tmp_path):
    # run in an empty directory: a stage that ran would fail on the missing params.yaml or write outputs here
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:")
    assert list(tmp_path.iterdir()) == []


def test_a_stage_under_a_python_without_the_requirements_says_so_in_one_line(tmp_path):
    # -S: no site-packages, like the system python when the venv is not active
    r = subprocess.run([sys.executable, "-S", "-m", "stages.prepare"], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f"this python ({sys.executable}) lacks torch" in r.stderr and ". .venv/bin/activate" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_envcheck_finds_modules_without_importing_them():
    assert envcheck.missing(["os", "kdprune_no_such_module"]) == ["kdprune_no_such_module"]
    assert envcheck.missing() == []  # the test run's python is the venv


def test_dispatcher_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "kdprune", "--help"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for command in ("sweep", "report", "frontier", "study", "presets", "relog", "compare", "runcache"):
        assert command in r.stdout
    r = subprocess.run([sys.executable, "-m", "kdprune", "presets", "list"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "cifar100-resnet152" in r.stdout


def test_dispatcher_passes_arguments_and_refuses_missing_or_unknown_commands(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(tracking_cli, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["relog"]) == 0 and seen == [["relog"]]
    monkeypatch.setattr(presets, "main", lambda argv: seen.append(argv) or 5)
    assert cli.main(["presets", "show", "x", "--queue"]) == 5 and seen[-1] == ["show", "x", "--queue"]
    monkeypatch.setitem(cli.COMMANDS, "frontier", ("kdprune.no_such_module", ()))
    assert cli.main(["frontier", "--all"]) == 2
    assert "'frontier' is not available in this version" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2


@pytest.mark.parametrize("arg", ["--help", "-h", "help"])
def test_run_sh_help(arg):
    r = subprocess.run(["bash", str(ROOT / "run.sh"), arg], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("usage: ./run.sh")
    assert "./run.sh preset NAME [--queue] [--dry-run] [-- DVC_EXP_RUN_ARGS]" in r.stdout


def test_run_sh_unknown_command_exits_2():
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr and "usage" in r.stderr


def test_preset_run_help_shows_extra_arguments_as_optional(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdprune.presets", "run", "--help"], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "[extra ...]" in r.stdout and "optional" in r.stdout


FAKE_APT = """#!/usr/bin/env bash
# a fake apt-get: holds the lists lock for the first $LOCKED calls
n=$(cat "$STATE" 2>/dev/null || echo 0); echo $((n + 1)) > "$STATE"
echo "apt-get $*" >> "$STATE.log"
if [ "$n" -lt "$LOCKED" ]; then
  echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)" >&2
  exit 100
fi
exit 0
"""


def setup_dataset(tmp_path, locked, timeout, **env_vars):
    """run.sh's setup_dataset (sourced: no venv, no dvc) with a fake apt-get and no dataset installed."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "apt-get").write_text(FAKE_APT)
    (bin_ / "apt-get").chmod(0o755)
    (bin_ / "id").write_text("#!/bin/sh\necho 0\n")  # as root
    (bin_ / "id").chmod(0o755)
    e = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", STATE=str(tmp_path / "calls"), LOCKED=str(locked),
             KDPRUNE_FMNIST_DIR=str(tmp_path / "none"), KDPRUNE_APT_LOCK_TIMEOUT=str(timeout),
             KDPRUNE_APT_LOCK_POLL="0.2")
    e.update(env_vars)
    return subprocess.run(["bash", "-c", f"source {ROOT / 'run.sh'}; setup_dataset"], env=e, capture_output=True,
                          text=True, timeout=60)


def test_setup_waits_for_the_apt_lock(tmp_path):
    r = setup_dataset(tmp_path, locked=3, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "waiting up to 30 s for /var/lib/apt/lists/lock" in r.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[-1].endswith("install -y -qq dataset-fashion-mnist")
    # the first try fails fast (the wait is announced), the next ones let apt wait for the rest of the 30 s
    waits = [int(c.split("DPkg::Lock::Timeout=")[1].split()[0]) for c in calls]
    assert [c.split()[-1] for c in calls] == ["-qq"] * 4 + ["dataset-fashion-mnist"]  # update x 4, install
    assert waits[0] == 0 and all(0 < w <= 30 for w in waits[1:4]) and waits[4] == 0


def test_setup_gives_up_on_a_held_apt_lock_with_one_clear_line(tmp_path):
    r = setup_dataset(tmp_path, locked=10 ** 6, timeout=1)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: /var/lib/apt/lists/lock is still held by another apt/dpkg process after 1 s")
    assert "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" in last


@pytest.mark.parametrize("var", ["KDPRUNE_APT_LOCK_TIMEOUT", "KDPRUNE_APT_LOCK_POLL"])
def test_hostile_apt_waits_run_nothing_and_name_the_variable(tmp_path, var):
    """Old: run.sh put KDPRUNE_APT_LOCK_TIMEOUT into bash arithmetic, where 'a[$(cmd)]' runs cmd."""
    pwned = tmp_path / "pwned"
    hostile = f"SECONDS[$(touch {pwned})]"  # set -u stops 'a[...]' (unset) first; a set name runs the $(...)
    # the path that used to run it: setup with a held apt lock (a fake apt-get, as root)
    r = setup_dataset(tmp_path, locked=3, timeout=30, **{var: hostile})
    assert not pwned.exists() and r.returncode == 2
    assert r.stderr == f"error: {var} = '{hostile[:80]}' is invalid: must be " + (  # abbreviated to 80
        "a whole number of seconds in [0, 86400] (default 300)\n" if var.endswith("TIMEOUT") else
        "a number of seconds in (0, 3600), e.g. 5 or 0.2 (default 5)\n")
    assert not (tmp_path / "calls.log").exists()  # refused before apt-get ran
    # checked first: every command refuses it, even help
    too_big = "86401" if var.endswith("TIMEOUT") else "3600"
    for value in (hostile, f"a[$(touch {pwned})]", too_big, "-1", "1e3", " 5", "0x10", "5\n6"):
        r = subprocess.run(["bash", str(ROOT / "run.sh"), "help"], env=dict(os.environ, **{var: value}),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith(f"error: {var} = "), (value, r.stderr)
        assert len(r.stderr.splitlines()) == 1
    assert not pwned.exists()
    for value in ("0", "86400") if var.endswith("TIMEOUT") else ("5", "0.2", "3599.999"):
        r = subprocess.run(["bash", str(ROOT / "run.sh"), "help"], env=dict(os.environ, **{var: value}),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith("usage: ./run.sh"), (value, r.stderr)


def test_setup_runtime_names_the_device(monkeypatch):
    threads = torch.get_num_threads()
    lines = []
    try:
        assert runtime.setup_runtime(RuntimeParams(device="cpu", threads=1, bf16=False), 0, log=lines.append).type == "cpu"
    finally:
        torch.set_num_threads(threads)
    assert lines == ["device: cpu (1 threads); training bf16 autocast off (runtime.bf16: false)"]


def test_the_device_line_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"NVIDIA H100 80GB HBM3 #{i}")
    assert runtime.describe_device(torch.device("cuda", 0)) == "device: cuda:0 NVIDIA H100 80GB HBM3 #0"


class FakeClock:
    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def test_without_a_terminal_a_long_epoch_prints_progress_lines(monkeypatch):
    monkeypatch.setattr(loop, "progress_enabled", lambda: False)  # stdout is a log file, not a TTY
    from tests.train.test_resume import loaders, setup

    model, _, _ = setup("teacher")
    tr, te = loaders()  # 256 images, batches of 64: 4 batches per epoch
    lines = []
    hb = loop.Heartbeat(every=30.0, clock=FakeClock(step=11.0))  # 11 s per clock read: a line every 3rd batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loop.fit(model, tr, te, TrainParams(epochs=2, batch_size=64), runtime=RuntimeParams(threads=1), name="t",
                  log=lines.append, heartbeat=hb)
    finally:
        torch.set_num_threads(threads)
    progress = [ln for ln in lines if " batch " in ln]
    assert [ln.split(" loss ")[0] for ln in progress] == ["t epoch 1/2 batch 3/4", "t epoch 2/2 batch 2/4"]
    assert all(ln.endswith(" img/s") and float(ln.split(" loss ")[1].split()[0]) > 0 for ln in progress)


def test_heartbeat_is_due_every_interval():
    hb = loop.Heartbeat(every=30.0, clock=FakeClock(step=10.0))
    assert [hb.due() for _ in range(7)] == [False, False, True, False, False, True, False]


def test_a_gpu_preset_on_a_cpu_warns_with_a_rough_estimate(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert presets.main(["run", "cifar10-resnet20", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: preset cifar10-resnet20 is meant for a GPU") and "rough estimate" in err
    params, _ = presets.resolve("cifar10-resnet20")
    # ResNet-20 on CIFAR-10: 40.8 MMACs forward; (30 x 3 + 5 x 4 + 5 x 3) passes x 50k images
    expected = 125 * 50_000 * 2 * 40.8e6 / (presets.CPU_GFLOPS_PER_CORE * 1e9 * 2)
    assert presets.cpu_seconds(params, cores=2) == pytest.approx(expected, rel=0.01)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert presets.cpu_warning("cifar10-resnet20", params) is None
