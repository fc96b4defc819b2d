"""Beyond one machine (issue #12), with clones on this box standing in for machines: a shared local-directory
DVC remote and run-cache, experiments carried through a bare git remote (`dvc exp push/pull`), a real
`mlflow server` with --serve-artifacts, and sweeps sharded over two workers.

Slow (real `dvc repro`, queued experiments and an mlflow server on tiny data); each test's measured cost on
the 2-core dev box under load is in its docstring."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from kdprune.experiments import args as exp_args
from kdprune.experiments import queue as exp_queue
from kdprune.experiments import runs as exp_runs
from kdprune.experiments import sweep
from tests.pipeline.test_e2e import dvc, free_port, git, lock_md5, make_repo

@pytest.mark.parametrize("bad", ["", "1", "0/2", "3/2", "1/1001", "-1/2", "1/2/3", "a/b", "1.0/2", " 1/2", "１/2",
                                 "1/99999"])
def test_shard_must_be_k_of_n(bad, capsys):
    with pytest.raises(exp_runs.FrontierError, match=r"^--shard .* is invalid: use K/N with integers 1 <= K <= N <= 1000"):
        exp_args.parse_shard(bad)
    assert exp_args.parse_shard("2/3") == (2, 3) and exp_args.parse_shard("1000/1000") == (1000, 1000)


class FakeQueue:
    """DVC's queue as wait_for_queue sees it: entries per poll, live processes, a clock that polls advance."""

    def __init__(self, monkeypatch, entries, alive):
        self.entries, self.alive, self.now, self.calls = entries, alive, 0.0, []
        monkeypatch.setattr(exp_queue, "queue_status", lambda: [dict(e) for e in self.entries])
        monkeypatch.setattr(exp_queue, "queue_alive", lambda revs: self.alive(self.now, revs))
        monkeypatch.setattr(exp_queue, "start_workers", lambda n: self.calls.append(("start", n)))
        monkeypatch.setattr(exp_queue, "dvc", lambda *a, check=True: self.remove(a))
        monkeypatch.setattr(exp_queue.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(exp_queue.time, "sleep", self.sleep)

    def sleep(self, seconds):
        self.now += seconds
        assert self.now < 10_000, "wait_for_queue never returned"

    def remove(self, args):
        """What DVC 3.67 does (checked by hand on a stale entry): `queue remove` takes queued and finished
        entries only, so a 'Running' one stays and blocks the next run; `queue kill NAME` marks it Failed."""
        self.calls.append(args)
        for e in self.entries:
            if args[:2] == ("queue", "remove") and e["rev"] in args[2:] and e["status"] != "Running":
                e["status"] = "Failed"
            if args[:2] == ("queue", "kill") and e["name"] in args[2:]:
                e["status"] = "Failed"


def test_a_task_left_running_by_a_dead_worker_is_removed_and_named_not_waited_on_forever(monkeypatch):
    # seen in the study: the worker's monitor stopped it at 18:50:22, the task stayed 'Running' with no process
    q = FakeQueue(monkeypatch, [{"rev": "aa", "name": "done", "status": "Success"},
                                {"rev": "9852a3d", "name": "study-kd_chosen-r0p9-s3", "status": "Running"}],
                  alive=lambda now, revs: now < 30)  # the worker dies 30 s in
    logs = []
    status = exp_queue.wait_for_queue(poll=5, lost_after=120, log=logs.append)
    assert q.calls == [("queue", "kill", "study-kd_chosen-r0p9-s3")]  # not restarted: it cannot be resumed
    assert 150 <= q.now <= 160  # 30 s alive + 120 s without any process (+ one poll)
    assert [s["status"] for s in status] == ["Success", "Failed"]
    assert "LOST study-kd_chosen-r0p9-s3 (Running)" in logs[0] and "to rerun" in logs[0]


def test_queued_tasks_without_a_worker_get_one_fresh_worker_then_are_removed(monkeypatch):
    q = FakeQueue(monkeypatch, [{"rev": "bb", "name": "q1", "status": "Queued"}], alive=lambda now, revs: False)
    logs = []
    exp_queue.wait_for_queue(poll=5, lost_after=60, log=logs.append)
    assert q.calls == [("start", 1), ("queue", "remove", "bb")]  # one restart, then given up
    assert "starting one" in logs[0] and "LOST q1 (Queued)" in logs[1]

    # the fresh worker picks the task up and finishes it: nothing is removed
    entries = [{"rev": "cc", "name": "q2", "status": "Queued"}]
    q = FakeQueue(monkeypatch, entries, alive=lambda now, revs: False)

    def start(n):
        q.calls.append(("start", n))
        entries[0]["status"] = "Success"
    monkeypatch.setattr(exp_queue, "start_workers", start)
    assert exp_queue.wait_for_queue(poll=5, lost_after=60, log=logs.append)[0]["status"] == "Success"
    assert q.calls == [("start", 1)]


def test_a_worker_that_never_started_stops_the_run_at_once_with_its_error(monkeypatch, tmp_path):
    """Part 7 of the structured study: the daemon could not start the worker (no dvc on PATH), and each of 15
    experiments waited 254 s before it was called lost. Now the start log's traceback ends the run at once."""
    log = tmp_path / "sweep-queue-start.log"
    log.write_text("Started '1' new experiments task queue worker.\nTraceback (most recent call last):\n"
                   "  File \"daemon.py\", line 1\nFileNotFoundError: [Errno 2] No such file or directory: 'dvc'\n")
    monkeypatch.setattr(exp_queue, "START_LOG", log)
    q = FakeQueue(monkeypatch, [{"rev": "ee", "name": "study-core-r0p2-s0", "status": "Queued"}],
                  alive=lambda now, revs: False)
    with pytest.raises(SystemExit) as e:
        exp_queue.wait_for_queue(poll=5, lost_after=120, log=print)
    assert "did not start" in str(e.value) and "No such file or directory: 'dvc'" in str(e.value)
    assert "\n" not in str(e.value)  # one line
    assert q.now < 10 and q.calls == [("queue", "remove", "ee")]  # no 120-s wait, no restart; the task removed

    # a live worker is waited for whatever the log says, and a log without a traceback changes nothing
    entries = [{"rev": "ff", "name": "ok", "status": "Running"}]
    q = FakeQueue(monkeypatch, entries, alive=lambda now, revs: now < 20 or not entries.__setitem__(
        0, {**entries[0], "status": "Success"}))
    assert exp_queue.wait_for_queue(poll=5, lost_after=120, log=print)[0]["status"] == "Success"
    log.write_text("Started '1' new experiments task queue worker.\n")
    assert exp_queue.start_failure() is None
    log.unlink()
    assert exp_queue.start_failure() is None


def test_a_long_experiment_with_a_live_worker_is_waited_for(monkeypatch):
    entries = [{"rev": "dd", "name": "long", "status": "Running"}]
    q = FakeQueue(monkeypatch, entries, alive=lambda now, revs: True)

    def sleep(seconds):  # finishes after 2 hours, far beyond lost_after
        q.now += seconds
        if q.now >= 7200:
            entries[0]["status"] = "Success"
    monkeypatch.setattr(exp_queue.time, "sleep", sleep)
    assert exp_queue.wait_for_queue(poll=5, lost_after=120, log=print)[0]["status"] == "Success"
    assert q.calls == []


def test_a_lost_running_task_and_a_lost_queued_one_both_leave_the_queue(monkeypatch):
    """Old: both were given to `dvc queue remove`, which leaves a 'Running' entry in place; the next experiment
    of the study then refused to start ("DVC's queue already holds 1 ... running experiment") and the part ended
    early, 2 hours before its time."""
    q = FakeQueue(monkeypatch, [{"rev": "r1", "name": "study-a", "status": "Running"},
                                {"rev": "q1", "name": "study-b", "status": "Queued"}], alive=lambda now, revs: False)
    q.calls.append(("start", 1))  # as if the one fresh worker had been tried already
    status = exp_queue.wait_for_queue(poll=5, lost_after=60, log=lambda m: None)
    assert ("queue", "kill", "study-a") in q.calls and ("queue", "remove", "q1") in q.calls
    assert [s["status"] for s in status] == ["Failed", "Failed"]


def test_no_experiment_is_queued_while_the_last_worker_is_still_closing(monkeypatch):
    """Seen in the structured study: the worker's monitor shut it down 10 s after its task ended, the next
    experiment was queued in that window, the closing worker received it and exited with it."""
    now = [0.0]
    monkeypatch.setattr(exp_queue.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(exp_queue.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    events = []
    monkeypatch.setattr(exp_queue, "queue_alive", lambda revs: events.append(("alive?", now[0])) or now[0] < 12)
    monkeypatch.setattr(exp_queue, "queue_status", lambda: [])
    monkeypatch.setattr(exp_queue, "dvc", lambda *a, **k: events.append(a[:3]))
    monkeypatch.setattr(exp_queue, "start_workers", lambda n: events.append(("start", n)))
    monkeypatch.setattr(exp_queue, "wait_for_queue", lambda **k: [])
    monkeypatch.setattr(exp_queue, "run_names", lambda experiment: {})
    exp_queue.run_grid([(0, 0.9)], [], 1, "study-x", "kdprune")
    queued_at = next(i for i, e in enumerate(events) if e[:3] == ("exp", "run", "--queue"))
    assert events[queued_at - 1] == ("alive?", 12.0)  # queued only once the closing worker was gone
    # a worker that stays (someone else's, busy) is waited for at most WORKER_EXIT_WAIT s, then left to the wait
    now[0] = 0.0
    monkeypatch.setattr(exp_queue, "queue_alive", lambda revs: True)
    assert exp_queue.wait_for_idle_workers() is False and now[0] == exp_queue.WORKER_EXIT_WAIT


def test_queue_alive_reads_the_worker_and_experiment_pid_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    workers, runs = tmp_path / exp_queue.WORKER_PIDS, tmp_path / exp_queue.RUN_PIDS
    workers.mkdir(parents=True)
    (workers / "dvc-exp-worker-1.pid").write_text(f"{dead.pid}\n")
    (workers / "dvc-exp-worker-2.pid").write_text("not a pid")
    assert not exp_queue.queue_alive(["abc"])  # a dead worker, a garbled file, no experiment file
    (runs / "abc").mkdir(parents=True)
    (runs / "abc" / "abc.pid").write_text(str(os.getpid()))
    assert exp_queue.queue_alive(["abc"]) and not exp_queue.queue_alive(["other"])
    (workers / "dvc-exp-worker-3.pid").write_text(str(os.getpid()))
    assert exp_queue.queue_alive([])


@pytest.mark.parametrize("n_seeds,n", [(1, 2), (2, 2), (3, 2), (5, 3), (2, 4), (1, 1)])
def test_shards_are_disjoint_deterministic_and_cover_the_grid(n_seeds, n):
    grid = [(s, r) for s in range(n_seeds) for r in (0.9, 0.5, 0.8)]
    parts = [sweep.shard(grid, k, n) for k in range(1, n + 1)]
    assert sorted(g for p in parts for g in p) == sorted(grid)  # every point once
    assert parts == [sweep.shard(list(reversed(grid)), k, n) for k in range(1, n + 1)]  # order-free
    if n_seeds >= n:  # each seed on one worker: its teacher is trained once without sharing
        owners = {s: {k for k, p in enumerate(parts) for ss, _ in p if ss == s} for s in range(n_seeds)}
        assert all(len(o) == 1 for o in owners.values())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= (3 if n_seeds >= n else 1)  # balanced (by seeds, or by points)


# what DVC 3.67 prints when the run-cache restores a stage (dvc/stage/cache.py StageCache.restore)
RESTORED = "Stage 'train_teacher' is cached - skipping run, checking out outputs"


def with_remote(tmp_path: Path, venv_bin: Path) -> tuple[Path, dict, Path]:
    """Clone A: make_repo + a local-directory DVC remote (committed in .dvc/config) + a bare git `origin`."""
    repo, env = make_repo(tmp_path, venv_bin)
    p = yaml.safe_load((repo / "params.yaml").read_text())  # smaller still: several pipelines per test
    p["data"].update(train_subset=100, test_subset=50)
    p["runtime"].update(threads=1)
    p["teacher"].update(epochs=1)
    p["evaluate"].update(latency_repeats=0, onnx=False)
    p["quantize"]["method"] = "none"  # INT8 is made from the ONNX export
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    store, origin = tmp_path / "dvc-store", tmp_path / "origin.git"
    dvc(repo, env, "remote", "add", "-d", "store", str(store))
    git(repo, env, "add", ".dvc/config", "params.yaml")
    git(repo, env, "commit", "-qm", "dvc remote")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True, capture_output=True)
    git(repo, env, "remote", "add", "origin", str(origin))
    git(repo, env, "push", "-q", "origin", "main")
    return repo, env, origin


def clone(tmp_path: Path, env: dict, origin: Path, name: str) -> tuple[Path, dict]:
    """A fresh `git clone` of origin: another machine (its own DVC cache, site cache and tmp dirs)."""
    path = tmp_path / name
    subprocess.run(["git", "clone", "-q", str(origin), str(path)], env=env, check=True, capture_output=True)
    return path, dict(env, DVC_SITE_CACHE_DIR=str(tmp_path / f"site-cache-{name}"))


def exp_show(repo: Path, env: dict) -> dict[str, dict]:
    """`dvc exp show --json` -> {experiment name: its metrics merged over files}."""
    rows = json.loads(dvc(repo, env, "exp", "show", "--json", "-A"))
    out = {}
    for commit in rows:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                merged = {}
                for f in (data.get("metrics") or {}).values():
                    merged.update(f.get("data") or {})
                out[rev.get("name") or exp.get("name")] = merged
    return out


@pytest.mark.slow
def test_run_cache_and_experiments_travel_between_clones(tmp_path, venv_bin):
    """Clone A reproduces and pushes (data, run-cache, an experiment); a fresh clone B pulls them: its
    `dvc exp run` trains no teacher (the baseline's and seed 1's both come from the remote) and B's
    `dvc exp show` lists A's experiment with its metrics."""
    a, env, origin = with_remote(tmp_path, venv_bin)
    out = dvc(a, env, "repro")
    assert "Running stage 'train_teacher'" in out
    git(a, env, "add", "-A")
    git(a, env, "commit", "-qm", "baseline")
    dvc(a, env, "push", "--run-cache")  # the workspace's outputs (the baseline's dvc.lock) + the run records
    git(a, env, "push", "-q", "origin", "main")
    # an experiment with another seed: a teacher that is in no committed dvc.lock, only in the run-cache
    out = dvc(a, env, "exp", "run", "--name", "exp-a", "-S", "seed=1")
    assert "Running stage 'train_teacher'" in out
    seed1_teacher = lock_md5(a, "train_teacher", "models/teacher.pt")
    dvc(a, env, "exp", "push", "origin", "exp-a")
    # `dvc push --run-cache` copies the records but not the (cache: false) metrics they name: kdprune.runcache
    # pushes both
    py = str(venv_bin / "python")
    subprocess.run([py, "-m", "kdprune.runcache", "push"], cwd=a, env=env, check=True, capture_output=True)

    b, env_b = clone(tmp_path, env, origin, "b")
    dvc(b, env_b, "pull", "--run-cache")
    subprocess.run([py, "-m", "kdprune.runcache", "pull"], cwd=b, env=env_b, check=True, capture_output=True)
    baseline_teacher = lock_md5(b, "train_teacher", "models/teacher.pt")
    assert (b / "models" / "teacher.pt").exists()
    out = dvc(b, env_b, "exp", "run", "-S", "prune.ratio=0.9")
    assert "Stage 'train_teacher' didn't change" in out and "Running stage 'train_teacher'" not in out
    assert "Running stage 'prune'" in out
    assert lock_md5(b, "train_teacher", "models/teacher.pt") == baseline_teacher
    # seed 1: B never had this teacher in a dvc.lock; DVC's run-cache (pulled from A's pushes) restores it
    out = dvc(b, env_b, "exp", "run", "-S", "seed=1", "-S", "prune.ratio=0.9")
    assert RESTORED in out and "Running stage 'train_teacher'" not in out
    assert lock_md5(b, "train_teacher", "models/teacher.pt") == seed1_teacher

    assert "exp-a" not in exp_show(b, env_b)
    dvc(b, env_b, "exp", "pull", "origin", "exp-a")
    shown = exp_show(b, env_b)
    assert "exp-a" in shown, sorted(shown)
    assert {"acc_teacher", "acc_kd", "acc_finetune", "compression_ratio"} <= set(shown["exp-a"])


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store and --serve-artifacts; stop() and start() again
    on the same port and store stand in for an outage."""

    def __init__(self, tmp_path: Path, venv_bin: Path, env: dict, *extra: str):
        self.db, self.artifacts = tmp_path / "server" / "mlflow.db", tmp_path / "server" / "artifacts"
        self.db.parent.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(venv_bin / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.db}",
                    "--artifacts-destination", str(self.artifacts), "--serve-artifacts", "--host", "127.0.0.1",
                    "--port", str(self.port), "--workers", "1", *extra]
        self.env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
        self.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.log = tmp_path / "server" / "server.log"
        self.proc = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen(self.cmd, cwd=self.db.parent, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return self
            except OSError:
                assert self.proc.poll() is None, f"mlflow server exited:\n{self.log.read_text()[-3000:]}"
                assert time.time() < deadline, "mlflow server did not come up"
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path, venv_bin):
    server = MlflowServer(tmp_path, venv_bin, dict(os.environ))
    yield server
    server.stop()


def pipeline_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdprune")
    return client.search_runs([exp.experiment_id], filter_string="tags.`kdprune.kind` = 'pipeline'")


def pipeline_runs_or_none(uri: str) -> list:
    """``pipeline_runs``, or [] while the experiment does not exist yet or the server does not answer."""
    try:
        return pipeline_runs(uri)
    except Exception:  # noqa: BLE001
        return []


def queue_logs(repos: list[tuple[Path, dict]], name: str) -> str:
    """`dvc queue logs <name>` from whichever clone ran that experiment."""
    for repo, env in repos:
        r = subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=env, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout
    raise AssertionError(f"no clone has queue logs for {name}")


@pytest.mark.slow
def test_sweep_sharded_over_two_workers_with_a_shared_remote_and_mlflow_server(tmp_path, venv_bin, mlflow_server):
    """Two clones run `kdprune.sweep --shard 1/2` and `--shard 2/2` (--pull --push) one after the other against
    one DVC remote, one git remote and one `mlflow server`: every grid point is logged once, the seed's
    teacher is trained once in total, artifacts travel over HTTP into the server's --artifacts-destination,
    and `kdprune.report` on either clone sees the whole grid. Then an outage: with the server down, `dvc
    repro`'s track stage fails and the results stay in metrics/; with it back (same port, same store),
    `kdprune.tracking relog` logs exactly one run."""
    a, env, origin = with_remote(tmp_path, venv_bin)
    server = mlflow_server.start()
    env = dict(env, MLFLOW_TRACKING_URI=server.uri)
    b, env_b = clone(tmp_path, env, origin, "b")
    py = str(venv_bin / "python")
    for repo, e, k in ((a, env, 1), (b, env_b, 2)):
        r = subprocess.run([py, "-m", "kdprune.sweep", "--ratios", "0.6,0.7", "--seeds", "0", "--shard", f"{k}/2",
                            "--pull", "--push"], cwd=repo, env=e, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"shard {k}/2: 1 of 2 experiments" in r.stdout
        assert "failed: none; missing: none; duplicated: none" in r.stdout, r.stdout

    runs = pipeline_runs(server.uri)
    assert sorted((r.data.params["prune.ratio"], r.data.params["seed"]) for r in runs) == [("0.6", "0"), ("0.7", "0")]
    assert all(r.info.status == "FINISHED" for r in runs)
    logs = [queue_logs([(a, env), (b, env_b)], r.data.tags["dvc_exp_name"]) for r in runs]
    assert sum(log.count("Running stage 'train_teacher'") for log in logs) == 1  # one teacher in total
    assert sum(RESTORED in log for log in logs) == 1
    for run in runs:  # over HTTP into the server's store; no client keeps a local MLflow store
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        exp_id = run.info.experiment_id
        assert (server.artifacts / exp_id / run.info.run_id / "artifacts" / "metrics" / "evaluate.json").is_file()
    for repo in (a, b):
        assert not (repo / "mlartifacts").exists() and not (repo / "mlflow.db").exists()
    refs = subprocess.run(["git", "ls-remote", str(origin), "refs/exps/*"], capture_output=True, text=True).stdout
    assert len(refs.splitlines()) == 2, refs  # both workers pushed their experiment

    rep = subprocess.run([py, "-m", "kdprune.report", "--no-mlflow-summary"], cwd=b, env=env_b, capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert len((b / "metrics" / "report_runs.csv").read_text().splitlines()) == 1 + 2

    # outage: the server is down while `dvc repro` (ratio 0.5, seed 0: a new grid point) runs its track stage
    server.stop()
    r = subprocess.run(["dvc", "repro"], cwd=b, env=dict(env_b, KDPRUNE_MLFLOW_WAIT_S="0"), capture_output=True,
                       text=True, timeout=900)  # no waiting for the server: track fails at once
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "could not log to MLflow" in out, out[-3000:]
    assert RESTORED in out and "Running stage 'train_teacher'" not in out
    assert (b / "metrics" / "evaluate.json").is_file()
    server.start()
    relog = subprocess.run([py, "-m", "kdprune.tracking", "relog"], cwd=b, env=env_b, capture_output=True, text=True,
                           timeout=300)
    assert relog.returncode == 0 and "logged run" in relog.stdout, relog.stdout + relog.stderr
    relog = subprocess.run([py, "-m", "kdprune.tracking", "relog"], cwd=b, env=env_b, capture_output=True, text=True,
                           timeout=300)
    assert relog.returncode == 0 and "already logged" in relog.stdout, relog.stdout + relog.stderr
    runs = pipeline_runs(server.uri)
    assert sorted((r.data.params["prune.ratio"], r.data.params["seed"]) for r in runs) == [
        ("0.5", "0"), ("0.6", "0"), ("0.7", "0")]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_basic_auth_server_refuses_anonymous_clients_and_logs_with_credentials(tmp_path, venv_bin):
    """`mlflow server --app-name basic-auth` (mlflow 3.17.2 + Flask-WTF, the `mlflow[auth]` extra pinned in
    requirements.txt), its admin password set in an auth config file (MLFLOW_AUTH_CONFIG_PATH): a REST call
    without credentials gets 401 and `relog` exits 2 naming the variables to set; with
    MLFLOW_TRACKING_USERNAME/PASSWORD the run, its metrics and artifacts go through. ~30 s."""
    pytest.importorskip("flask_wtf", reason="Flask-WTF (requirements.txt; the mlflow[auth] extra) is not installed: "
                                             "mlflow's basic-auth app cannot start without it")
    import base64
    import secrets
    import urllib.error

    from tests.tracking.test_tracking import make_result

    password = secrets.token_urlsafe(18)
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path / 'basic_auth.db'}\n"
                   f"admin_username = admin\nadmin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 60\n")  # the test's many calls: one password hash per minute
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    server = MlflowServer(tmp_path, venv_bin, env, "--app-name", "basic-auth")
    try:
        server.start()
        search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=10"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(search, timeout=10)
        assert denied.value.code == 401
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        req = urllib.request.Request(search, headers={"Authorization": f"Basic {token}"})
        assert urllib.request.urlopen(req, timeout=10).status == 200

        work = tmp_path / "work"
        work.mkdir()
        make_result(work)
        client_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        client_env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), MLFLOW_TRACKING_URI=server.uri,
                          KDPRUNE_MLFLOW_WAIT_S="0")
        relog = [str(venv_bin / "python"), "-m", "kdprune.tracking", "relog"]
        r = subprocess.run(relog, cwd=work, env=client_env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "HTTP 401" in r.stderr and "MLFLOW_TRACKING_PASSWORD" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        client_env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        r = subprocess.run(relog, cwd=work, env=client_env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "logged run" in r.stdout, r.stdout + r.stderr
        from mlflow.tracking import MlflowClient

        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        try:
            client = MlflowClient(server.uri)
            exp = client.get_experiment_by_name("kdprune")
            (run,) = client.search_runs([exp.experiment_id])
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        assert run.info.status == "FINISHED" and run.data.metrics["acc_kd"] == 90.0
        assert (server.artifacts / exp.experiment_id / run.info.run_id / "artifacts" / "metrics" / "evaluate.json"
                ).is_file()
    finally:
        server.stop()


WAITING = "did not answer"  # what kdprune.tracking prints while it waits for a tracking server that is down


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, poll: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` s or when ``proc`` exits first."""
    deadline = time.time() + timeout
    while True:
        found = check()
        if found:
            return found
        assert proc is None or proc.poll() is None, f"exited (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(poll)


def test_relog_waits_for_a_server_that_is_down_then_logs_once(tmp_path, venv_bin, mlflow_server):
    """`kdprune.tracking relog` against a server that is not up yet keeps trying (KDPRUNE_MLFLOW_WAIT_S); once the
    server starts on that port it logs exactly one FINISHED run. ~20 s (the server's start)."""
    from tests.tracking.test_tracking import make_result

    make_result(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               MLFLOW_TRACKING_URI=mlflow_server.uri, KDPRUNE_MLFLOW_WAIT_S="300", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    log = tmp_path / "relog.log"
    with open(log, "w") as fh:
        relog = subprocess.Popen([str(venv_bin / "python"), "-m", "kdprune.tracking", "relog"], cwd=tmp_path, env=env,
                                 stdout=fh, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for("retry message", lambda: WAITING in log.read_text(), 120, relog)
        mlflow_server.start()
        assert relog.wait(timeout=300) == 0, log.read_text()
    finally:
        if relog.poll() is None:
            relog.kill()
    assert "logged run" in log.read_text()
    runs = pipeline_runs(mlflow_server.uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]


@pytest.mark.slow
def test_queued_sweep_loses_and_duplicates_no_run_across_a_server_restart(tmp_path, venv_bin, mlflow_server):
    """A queued sweep (`kdprune.sweep`: `dvc exp run --queue` + `dvc queue start`, 3 experiments) while the
    `mlflow server` goes down and comes back on the same port and store: stopped as soon as the first
    experiment's run appears (its `track` may be cut off half-way), started again only once a `track` has
    hit the outage (its "did not answer" line in the queue's logs). The tracks wait and retry; at the end
    MLflow holds exactly one FINISHED run per experiment: 0 lost, 0 duplicated. ~6 min on the loaded 2-core box."""
    repo, env, _ = with_remote(tmp_path, venv_bin)
    server = mlflow_server.start()
    env = dict(env, MLFLOW_TRACKING_URI=server.uri, KDPRUNE_MLFLOW_WAIT_S="900")
    out = tmp_path / "sweep.log"
    with open(out, "w") as fh:
        proc = subprocess.Popen([str(venv_bin / "python"), "-m", "kdprune.sweep", "--ratios", "0.6,0.7,0.8",
                                 "--seeds", "0"], cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    queue_logs_dir = repo / ".dvc" / "tmp" / "exps" / "run"  # dvc queue logs: run/<id>/<id>.out

    def hit_outage():
        return [p for p in queue_logs_dir.glob("*/*.out") if WAITING in p.read_text(errors="replace")]

    try:
        wait_for("first MLflow run", lambda: server.proc.poll() is None and pipeline_runs_or_none(server.uri), 1200,
                 proc, poll=0.5)
        server.stop()
        wait_for("track waiting for the server", hit_outage, 1200, proc)
        time.sleep(3)  # a fixed part of the outage: more than one try fails
        server.start()
        assert proc.wait(timeout=1800) == 0, out.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert "3 experiments" in text and "failed: none; missing: none; duplicated: none" in text, text[-3000:]
    runs = pipeline_runs(server.uri)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    names = sorted(r.data.tags["dvc_exp_name"] for r in finished)
    assert len(finished) == 3 and len(set(names)) == 3 and all(n.startswith("sweep-r0p") for n in names), names
    assert sorted(r.data.params["prune.ratio"] for r in finished) == ["0.6", "0.7", "0.8"]
    assert not [r for r in runs if r.info.status == "RUNNING"], [r.info for r in runs]
    for run in finished:  # each run complete: its metrics and artifacts went through the restarted server
        assert {"acc_kd", "acc_finetune", "compression_ratio"} <= set(run.data.metrics)
        exp_id = run.info.experiment_id
        assert (server.artifacts / exp_id / run.info.run_id / "artifacts" / "metrics" / "evaluate.json").is_file()


# ---- multi-node DDP: 2 local "nodes" x 1 process, gloo, torchrun's c10d rendezvous on 127.0.0.1 ----------------

def test_multi_node_params_and_launch_command():
    from kdprune.train import distributed
    from kdprune.params import ParamsError, RuntimeParams, params_from_dict
    from tests.helpers import default_params

    cmd = distributed.launch_command(2, ["stages/train_teacher.py"], "stages.train_teacher", nnodes=3,
                                     rdzv_endpoint="node-0.cluster:29400")
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nnodes=3", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=node-0.cluster:29400", "--nproc_per_node=2", "-m", "stages.train_teacher"]
    assert "--standalone" in distributed.launch_command(2, ["x.py"], None)
    raw = default_params()
    for key, bad, msg in (("nnodes", 0, r"runtime.nnodes = 0 is invalid: must be in \[1, 1024\]"),
                          ("nnodes", 1025, r"runtime.nnodes = 1025 is invalid"),
                          ("rdzv_endpoint", "h:1;touch x", r"runtime.rdzv_endpoint = 'h:1;touch x' is invalid: must be"),
                          ("rdzv_endpoint", "$(id):80", r"runtime.rdzv_endpoint = '\$\(id\):80' is invalid"),
                          ("rdzv_endpoint", "host:0", "is invalid"), ("rdzv_endpoint", "host:65536", "is invalid"),
                          ("rdzv_endpoint", "host", "is invalid"), ("rdzv_endpoint", "-host:80", "is invalid")):
        p = default_params()
        p["runtime"][key] = bad
        with pytest.raises(ParamsError, match=msg):
            params_from_dict(p)
    raw["runtime"].update(nnodes=3, rdzv_endpoint="10.0.0.1:29400")
    raw["teacher"]["batch_size"] = 100  # 3 nodes x 1 process: the global batch must split in 3
    with pytest.raises(ParamsError, match=r"teacher.batch_size = 100 is invalid: must be divisible by runtime.nnodes x "
                                          r"runtime.nproc_per_node = 3"):
        params_from_dict(raw)
    raw["teacher"]["batch_size"] = raw["distill"]["batch_size"] = 96
    assert params_from_dict(raw).runtime.world == 3
    with pytest.raises(ParamsError, match=r"runtime.rdzv_endpoint = '' is invalid: runtime.nnodes = 2 needs"):
        distributed.relaunch_if_needed(RuntimeParams(nnodes=2))


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU (gloo) path")
def test_teacher_on_two_nodes_matches_the_single_process_layout(tmp_path):
    """Two "nodes" (two repos, as two machines would each have a clone) run the same `python -m
    stages.train_teacher` with runtime.nnodes = 2 and one rendezvous endpoint: each relaunches itself under
    torchrun --nnodes 2 --rdzv-backend c10d, and exactly one of them (global rank 0) writes the outputs, with
    the layout, shapes and metrics keys of the single-process run."""
    from kdprune import stage
    from tests.helpers import write_fake_dataset
    from tests.train.test_ddp import TORCHRUN_VARS, checkpoint_shape, files, make_repo as ddp_repo, run_stage

    raw = write_fake_dataset(tmp_path / "raw", n_train=120, n_test=40)
    single = ddp_repo(tmp_path / "single", raw, 1, None)
    run_stage(single, "stages.prepare")
    run_stage(single, "stages.train_teacher")
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for i in range(2):
        node = ddp_repo(tmp_path / f"node{i}", raw, 1, single / stage.PREPARED)
        p = yaml.safe_load((node / "params.yaml").read_text())
        p["runtime"].update(nnodes=2, rdzv_endpoint=endpoint)
        (node / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        nodes.append(node)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(CI="true", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = [subprocess.Popen([sys.executable, "-m", "stages.train_teacher"], cwd=n, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in nodes]
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(o[-3000:] for o in outs)
    assert sum(o.count("DDP: 2 processes, backend gloo, device cpu") for o in outs) == 1
    writers = [n for n in nodes if files(n)]
    assert len(writers) == 1, [files(n) for n in nodes]  # only global rank 0 writes, on its own node
    assert files(writers[0]) == files(single) == {"models/teacher.pt", "metrics/teacher.json", "plots/teacher.csv",
                                                 "logs/teacher.json"}
    assert checkpoint_shape(writers[0] / stage.TEACHER) == checkpoint_shape(single / stage.TEACHER)
    m1, m2 = (json.loads((r / "metrics/teacher.json").read_text()) for r in (single, writers[0]))
    assert m1.keys() == m2.keys() and m1["params_teacher"] == m2["params_teacher"]


def test_runcache_without_a_remote_is_a_one_line_error(tmp_path, venv_bin):
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "sc"))
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([str(venv_bin / "dvc"), "init", "-q"], cwd=tmp_path, env=env, check=True)
    r = subprocess.run([str(venv_bin / "python"), "-m", "kdprune.runcache", "push"], cwd=tmp_path, capture_output=True,
                       text=True, env=dict(env, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert r.returncode == 2 and r.stderr.startswith("error: push of the run-cache failed: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "remote" in r.stderr, r.stderr
