"""A venv that was not activated (.venv/bin/python -m kdprune study): DVC's queue daemon starts its worker as
plain `dvc`, and the stages run plain `python`; both must resolve to the venv (the study's part 7 lost every
experiment to "FileNotFoundError: 'dvc'" in the daemon when they did not)."""
import os
import shutil
import sys
from pathlib import Path

from kdprune import dvctool
from kdprune.experiments import queue as exp_queue


def fake_venv(tmp_path, monkeypatch) -> Path:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "dvc"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    return bin_dir


def test_dvc_env_puts_the_unactivated_venv_first_on_path(tmp_path, monkeypatch):
    bin_dir = fake_venv(tmp_path, monkeypatch)
    env = dvctool.dvc_env()
    assert env["PATH"].split(os.pathsep)[0] == str(bin_dir)
    assert shutil.which("dvc", path=env["PATH"]) == str(bin_dir / "dvc")
    assert shutil.which("python", path=env["PATH"]) == str(bin_dir / "python")
    assert env["PATH"].split(os.pathsep).count(str(bin_dir)) == 1


def test_queue_start_and_dvc_calls_pass_that_path(tmp_path, monkeypatch):
    bin_dir = fake_venv(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    seen = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def run(cmd, **kw):
        seen.append((cmd, kw.get("env")))
        return Done()
    monkeypatch.setattr(exp_queue.subprocess, "run", run)
    exp_queue.start_workers(1)
    exp_queue.dvc("queue", "status")
    assert [c[0] for c, _ in seen] == [str(bin_dir / "dvc")] * 2
    for _, env in seen:
        assert env is not None and env["PATH"].split(os.pathsep)[0] == str(bin_dir)
