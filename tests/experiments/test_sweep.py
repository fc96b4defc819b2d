"""python -m kdprune.sweep checks every argument before anything is pulled or queued: one line, exit 2."""
import sys
from pathlib import Path

import pytest

from kdprune.experiments import queue as exp_queue
from kdprune.experiments import sweep
from tests.helpers import committed_params_text


@pytest.fixture
def no_dvc(tmp_path, monkeypatch):
    """A repo with the committed params.yaml, where any call into DVC's queue (or the run-cache) fails the test."""
    (tmp_path / "params.yaml").write_text(committed_params_text())
    monkeypatch.chdir(tmp_path)
    calls = []

    def refuse(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called: the sweep queued (or pulled) before refusing its arguments")
        return f

    for name in ("run_grid", "dvc", "sync_run_cache"):
        monkeypatch.setattr(sweep, name, refuse(name))
    for name in ("dvc", "queue_status", "start_workers", "wait_for_queue"):
        monkeypatch.setattr(exp_queue, name, refuse(f"queue.{name}"))
    return calls


BAD = [
    (["--ratios", "nan"], "--ratios: nan is out of range: allowed [0, 1)"),
    (["--ratios", "0.5,inf"], "--ratios: inf is out of range"),
    (["--ratios=-inf"], "--ratios: -inf is out of range"),
    (["--ratios", "1"], "--ratios: 1.0 is out of range"),
    (["--ratios=-0.1"], "--ratios: -0.1 is out of range"),
    (["--ratios", "0.5,abc"], "--ratios: 'abc' is not a number"),
    (["--ratios", ","], "give 1 to 100 comma-separated prune ratios"),
    (["--ratios", "0.5,0.50"], "the ratios must be distinct"),
    (["--ratios", ",".join(f"0.{i:03d}" for i in range(101))], "give 1 to 100"),
    (["--ratios", "0.5", "--seeds", "1e20"], "--seeds '1e20': give 1 to 100 comma-separated integers in [0, 2^32)"),
    (["--ratios", "0.5", "--seeds", "100000000000000000000"], "integers in [0, 2^32)"),
    (["--ratios", "0.5", "--seeds", "4294967296"], "seeds must be distinct integers in [0, 2^32)"),
    (["--ratios", "0.5", "--seeds=-1"], "--seeds '-1'"),
    (["--ratios", "0.5", "--seeds", "1.5"], "--seeds '1.5'"),
    (["--ratios", "0.5", "--seeds", "0,0"], "distinct"),
    (["--ratios", "0.5", "--seeds", "1" * 5000], "--seeds '" + "1" * 80 + "':"),
    (["--ratios", "0.5", "-j", "-1"], "-j -1: allowed 1 to 64 parallel queue workers"),
    (["--ratios", "0.5", "-j", "0"], "-j 0: allowed 1 to 64"),
    (["--ratios", "0.5", "-j", "65"], "-j 65: allowed 1 to 64"),
    (["--ratios", "0.5", "--shard", "0/2"], "--shard '0/2' is invalid"),
    (["--ratios", "0.5", "--push", "--git-remote=--force"], "--git-remote '--force': must be a git remote"),
    (["--ratios", ",".join(f"0.{i:02d}" for i in range(50)), "--seeds", ",".join(map(str, range(21)))],
     "50 x 21 = 1050 experiments; a sweep runs at most 1000"),
    # valid with params.yaml's prune.ratio (0.8) and with 0.5, not with 0.9: at most 1 - ratio
    (["--ratios", "0.5,0.9", "-S", "prune.min_layer_density=0.15"], "--ratios 0.9 with -S: params.yaml: "
     "prune.min_layer_density = 0.15 is invalid"),
    (["--ratios", "0.5", "-S", "seed=3"], "seed: the sweep sets it"),
]


@pytest.mark.parametrize("argv, needle", BAD)
def test_bad_arguments_are_refused_before_anything_is_queued(no_dvc, capsys, argv, needle):
    """Old: -j -1 hung and left its queue entry behind (the next sweep refused to start); NaN/inf ratios and 1e20
    seeds were queued, and failed only inside DVC."""
    try:
        rc = sweep.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and not no_dvc, (rc, no_dvc, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_good_arguments_reach_the_queue(no_dvc, monkeypatch, capsys):
    got = []

    def run_grid(grid, extra, jobs, prefix, experiment):
        got.append((grid, extra, jobs))
        return {g: f"n{i}" for i, g in enumerate(grid)}, {f"n{i}": "Success" for i in range(len(grid))}, \
            {f"n{i}": 1 for i in range(len(grid))}, 1.0
    monkeypatch.setattr(sweep, "run_grid", run_grid)
    assert sweep.main(["--ratios", "0,0.5,0.999", "--seeds", "0,4294967295", "-j", "64", "-S", "distill.epochs=2"]) == 0
    (grid, extra, jobs), = got
    assert sorted(grid) == sorted((s, r) for s in (0, 4294967295) for r in (0.0, 0.5, 0.999)) and jobs == 64
    assert extra == ["-S", "distill.epochs=2"]


def test_dvc_is_found_beside_the_python_when_the_venv_is_not_activated(monkeypatch, tmp_path):
    from kdprune.experiments import queue as q
    monkeypatch.setenv("PATH", str(tmp_path))  # no dvc on PATH
    assert Path(q.dvc_exe()).parent == Path(sys.executable).parent
    monkeypatch.setattr(q.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(SystemExit, match="no dvc on PATH or beside"):
        q.dvc_exe()
