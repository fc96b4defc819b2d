"""kdprune/runlock.py: one pipeline at a time in a workspace, each stage on the params the run started with.

The DVC processes are stand-ins (``sleep``): ``runlock.dvc_process`` is what finds the real one."""
import json
import subprocess
import sys
import time

import psutil
import pytest

from kdprune import runlock
from tests.helpers import ROOT


def wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A repo root where DVC runs a stage in the main workspace (DVC_STAGE set, cwd = DVC_ROOT)."""
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "validate")
    return tmp_path


@pytest.fixture
def fake_dvc(monkeypatch):
    """Start stand-ins for DVC processes; ``use(p)`` makes ``p`` the DVC process of the stages that follow."""
    procs = []

    def start():
        p = subprocess.Popen(["sleep", "120"])
        procs.append(p)
        return p

    def use(p):
        monkeypatch.setattr(runlock, "dvc_process", lambda: psutil.Process(p.pid))

    yield start, use
    for p in procs:
        p.kill()
        p.wait()


def dvc_workspace_holder(root):
    path = root / runlock.DVC_EXP_LOCK_DIR / "rwlock"
    return json.loads(path.read_text()).get("write", {}).get("workspace") if path.exists() else None


def test_a_second_run_is_refused_a_changed_param_is_caught_and_dvc_refuses_to_stash(workspace, fake_dvc):
    from dvc.fs import localfs
    from dvc.lock import LockError
    from dvc.rwlock import rwlock

    start, use = fake_dvc
    a, b = start(), start()
    use(a)
    runlock.enter({"prune.ratio": 0.5, "seed": 0})  # validate of run A
    rec = runlock.read_record(workspace)
    assert rec["pid"] == a.pid and rec["params"] == {"prune.ratio": 0.5, "seed": 0} and rec["stage"] == "validate"
    assert dvc_workspace_holder(workspace)["pid"] == a.pid

    # DVC's `exp run` (also --queue / --temp) takes this write lock before it stashes the workspace or writes
    # params.yaml: while run A's DVC process lives, DVC refuses it, naming A
    with pytest.raises(LockError, match=rf"(?s)'workspace' is busy.*PID {a.pid}.*an experiment is running"):
        with rwlock(str(workspace / runlock.DVC_EXP_LOCK_DIR), localfs, "dvc exp run", [], ["workspace"], False):
            pass

    runlock.enter({"prune.ratio": 0.5, "seed": 0}, stage="prune")  # a later stage of A, same params: fine
    with pytest.raises(runlock.RunLockError) as e:  # params.yaml changed under A (another run's -S)
        runlock.enter({"prune.ratio": 0.6, "seed": 0}, stage="distill")
    assert str(e.value).startswith("params.yaml changed while this pipeline was running: prune.ratio was 0.5 when "
                                   "it started, is 0.6 now") and "stage distill stops" in str(e.value)

    use(b)  # a stage of another DVC process (one that got in before the mark) while A lives
    with pytest.raises(runlock.RunLockError, match=rf"^another experiment is running in this workspace \(DVC pid "
                                                   rf"{a.pid}: .*\); stage validate stops"):
        runlock.enter({"prune.ratio": 0.6, "seed": 0})

    a.kill()
    a.wait()  # A's DVC process ends: its watcher clears the record and DVC's entry (no stale-pid warning from DVC)
    wait_for(lambda: runlock.read_record(workspace) is None and dvc_workspace_holder(workspace) is None)
    runlock.enter({"prune.ratio": 0.6, "seed": 0})  # now B may run
    assert runlock.read_record(workspace)["pid"] == b.pid and dvc_workspace_holder(workspace)["pid"] == b.pid


def test_a_record_of_a_dead_dvc_process_is_taken_over(workspace, fake_dvc):
    start, use = fake_dvc
    dead = subprocess.Popen(["true"])
    dead.wait()
    (workspace / runlock.RECORD).write_text(json.dumps({"pid": dead.pid, "started": 1.0, "cmd": "dvc exp run",
                                                        "params": {"prune.ratio": 0.9}}))
    p = start()
    use(p)
    runlock.enter({"prune.ratio": 0.5})
    assert runlock.read_record(workspace)["pid"] == p.pid


def test_runs_outside_the_main_workspace_are_left_alone(workspace, fake_dvc, monkeypatch, tmp_path_factory):
    start, use = fake_dvc
    use(start())
    runlock.enter({"prune.ratio": 0.5})  # a run in the main workspace holds it
    use(start())
    temp = tmp_path_factory.mktemp("exps-tmp")  # a queued or --temp experiment: DVC_ROOT is the main repo
    monkeypatch.chdir(temp)
    runlock.enter({"prune.ratio": 0.7})  # not blocked, not recorded
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("DVC_STAGE")  # a stage run by hand (python -m stages.prune): not DVC's run
    runlock.enter({"prune.ratio": 0.7})
    assert runlock.read_record(workspace)["params"] == {"prune.ratio": 0.5}


def test_first_difference():
    assert runlock.first_difference({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 2]}) is None
    assert runlock.first_difference({"a": 1, "b": 2, "c": 3}, {"a": 2, "b": 3}) == \
        "a was 1 when it started, is 2 now (and 2 more keys)"
    assert runlock.first_difference({}, {"x": "y" * 500}) == f'x was absent when it started, is "{"y" * 76}... now'


def test_finds_the_dvc_process_above_the_shell(tmp_path):
    """DVC runs a stage under `$SHELL -c`: the owner is the nearest ancestor that runs `dvc`, not the shell."""
    fake = tmp_path / "dvc"  # a stand-in `dvc` that runs its argument as DVC runs a stage's cmd
    fake.write_text("import subprocess, sys\nsys.exit(subprocess.call(['/bin/sh', '-c', sys.argv[1]]))\n")
    probe = f"{sys.executable} -c 'from kdprune import runlock; p = runlock.dvc_process(); print(p and p.pid)'; true"
    proc = subprocess.Popen([sys.executable, str(fake), probe], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == str(proc.pid)
