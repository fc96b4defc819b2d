"""The real pipeline: two `dvc exp run` in one workspace; the second is refused before it touches params.yaml, and
MLflow gets exactly the first one's result. (A fresh clone's first `dvc repro`: tests/pipeline/test_e2e.py.)"""
import re
import subprocess
import time

import pytest
import yaml

from kdprune import runlock
from tests.pipeline.test_e2e import dvc, git, make_repo, mlflow_runs


def ran(out: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", out)


@pytest.mark.slow  # ~2.5 min on 2 shared cores: one full pipeline while a second `dvc exp run` is refused
def test_a_second_exp_run_in_the_workspace_is_refused_before_it_touches_params(tmp_path, venv_bin):
    repo, env = make_repo(tmp_path, venv_bin)
    first = subprocess.Popen(["dvc", "exp", "run", "-S", "prune.ratio=0.5"], cwd=repo, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        while not (repo / runlock.RECORD).exists():  # the run's first stage has marked the workspace busy
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() - started < 300, "validate never ran"
            time.sleep(0.1)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - started)))  # the case: the second starts 2 s later
        second = subprocess.run(["dvc", "exp", "run", "-S", "prune.ratio=0.6"], cwd=repo, env=env, text=True,
                                capture_output=True, timeout=300)
        during = yaml.safe_load((repo / "params.yaml").read_text())["prune"]["ratio"]
        out_first, _ = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    refused = second.stdout + second.stderr
    assert second.returncode != 0, refused
    assert "'workspace' is busy" in refused and f"PID {first.pid}" in refused, refused
    assert "[kdprune: an experiment is running in this workspace; start yours when it has finished]" in refused
    assert "Running stage" not in refused and during == 0.5  # refused before it wrote its -S into params.yaml

    assert first.returncode == 0, out_first[-4000:]
    name = re.search(r"Ran experiment\(s\): (\S+)", out_first).group(1)
    (run,) = mlflow_runs(repo)  # one result, of the first experiment's params, named for it
    assert run.info.status == "FINISHED" and run.data.tags["dvc_exp_name"] == name
    assert run.data.params["prune.ratio"] == "0.5"
    assert run.data.metrics["prunable_compression_ratio"] == pytest.approx(2.0, rel=1e-3)  # 1 / (1 - 0.5)
    assert yaml.safe_load((repo / "params.yaml").read_text())["prune"]["ratio"] == 0.5

    # once its DVC process has ended, the mark goes too (so DVC never warns about a dead pid's entry)
    deadline = time.monotonic() + 30
    while (repo / runlock.RECORD).exists() or "workspace" in (repo / ".dvc/tmp/exps/rwlock").read_text():
        assert time.monotonic() < deadline, "the workspace was not released"
        time.sleep(0.1)
