"""DVC's experiment queue: queue a grid of experiments (``dvc exp run --queue``), start its workers, wait for it
(and for tasks DVC's worker lost), and count each experiment's FINISHED MLflow runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from kdprune.dvctool import dvc_env, find_dvc
from kdprune.tracking.store import ALIASES_TAG, finished_pipeline_runs, tracking_uri

def dvc_exe() -> str:
    """``dvc`` on PATH, else the one beside this Python (a venv's bin/ that was not activated)."""
    found = find_dvc()
    if found is None:
        raise SystemExit(f"error: no dvc on PATH or beside {sys.executable}; run ./run.sh setup, or activate the venv")
    return found


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([dvc_exe(), *args], capture_output=True, text=True, env=dvc_env())
    if check and r.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def queue_status() -> list[dict]:
    """DVC's queue entries ({'name', 'status', ...}); `dvc queue status` has no JSON output."""
    from dvc.repo import Repo  # heavy optional dependency: only when talking to DVC

    with Repo(".") as repo:
        return list(repo.experiments.celery_queue.status())


START_LOG = Path(".dvc/tmp/sweep-queue-start.log")  # `dvc queue start`'s output, and its detached workers'


def start_workers(jobs: int) -> None:
    """`dvc queue start -j N`. Its output goes to a file, not a pipe: the detached workers inherit
    the handles, and a pipe would make this call wait for them instead of wait_for_queue."""
    START_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(START_LOG, "w") as fh:
        r = subprocess.run([dvc_exe(), "queue", "start", "-j", str(jobs)], stdout=fh, stderr=subprocess.STDOUT,
                           env=dvc_env())  # the detached worker is started as plain `dvc`: it must be on PATH
    if r.returncode != 0:
        raise SystemExit(f"error: dvc queue start failed:\n{START_LOG.read_text()}")


WORKER_PIDS = Path(".dvc/tmp/exps/celery")  # dvc-exp-worker-N.pid: DVC's queue workers (dvc-task)
RUN_PIDS = Path(".dvc/tmp/exps/run")  # <rev>/<rev>.pid: a queued experiment's own `dvc exp run` process
LOST_AFTER = 120.0  # seconds with tasks pending and none of these processes alive: the tasks are lost


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def queue_alive(revs: list[str]) -> bool:
    """A DVC queue worker, or the process of one of these queued experiments, is still running."""
    files = [*WORKER_PIDS.glob("dvc-exp-worker-*.pid"), *(RUN_PIDS / r / f"{r}.pid" for r in revs)]
    for f in files:
        try:
            pid = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid > 0 and pid_alive(pid):
            return True
    return False


def start_failure() -> str | None:
    """The last line of a traceback in the queue-start log (the worker's daemon could not start, e.g.
    ``FileNotFoundError: ... 'dvc'``), or None. The log is rewritten by each start_workers call."""
    try:
        text = START_LOG.read_text(errors="replace")
    except OSError:
        return None
    if "Traceback (most recent call last)" not in text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else None


def wait_for_queue(poll: float = 5.0, lost_after: float = LOST_AFTER,
                   log=lambda m: print(m, flush=True)) -> list[dict]:
    """Wait until no experiment is Queued or Running, and return the queue's entries.

    DVC's worker can exit with a task unfinished: its monitor stops it when an inspect call finds no task in
    time (seen here under load: the task stayed 'Running' with no process for 20 minutes, and a plain wait
    never ends; treeverse/dvc-task#77, treeverse/dvc#8165). So when tasks stay pending while no worker and
    none of their experiments' processes has been alive for ``lost_after`` seconds: queued tasks get a
    fresh worker, once; after that, or for a task left 'Running', the tasks are removed from the queue and
    named in the log. The caller then finds no result for them and reports them as failed; a study or a
    frontier search reruns them on its next run (nothing is recorded for them).

    When no process is alive and the queue-start log holds a traceback, the worker never started: every later
    experiment would be lost the same way, so the pending tasks are removed at once and this stops the run with
    that line (part 7 of the structured study lost 70 minutes to 254-s waits for 15 such tasks)."""
    dead_since: float | None = None
    restarted = False
    while True:
        status = queue_status()
        pending = [s for s in status if s.get("status") in ("Queued", "Running")]
        if not pending:
            return status
        if queue_alive([str(s.get("rev")) for s in pending]):
            dead_since = None
        elif (failure := start_failure()) is not None:
            drop(pending)
            raise SystemExit(f"error: DVC's queue worker did not start ({START_LOG}): {failure}")
        elif dead_since is None:
            dead_since = time.monotonic()
        elif time.monotonic() - dead_since >= lost_after:
            names = ", ".join(f"{s.get('name') or s.get('rev')} ({s.get('status')})" for s in pending)
            if not restarted and all(s.get("status") == "Queued" for s in pending):
                log(f"sweep: no DVC queue worker has run for {lost_after:g} s with {names} pending; starting one")
                start_workers(1)
                restarted, dead_since = True, None
            else:
                log(f"sweep: LOST {names}: no DVC queue worker or experiment process has run for {lost_after:g} s "
                    "(DVC's worker exited with the task unfinished); removed from the queue, to rerun")
                drop(pending)
                return queue_status()
        time.sleep(poll)


def drop(entries: list[dict]) -> None:
    """Take lost entries out of the queue, so that the next run does not find them pending. DVC 3.67's
    ``queue remove`` takes only queued and finished entries (a 'Running' one is "not a valid experiment name",
    seen in the study); ``queue kill`` marks a 'Running' one Failed, whether or not its process still lives."""
    running = [str(e.get("name") or e.get("rev")) for e in entries if e.get("status") == "Running"]
    queued = [str(e.get("rev")) for e in entries if e.get("status") != "Running"]
    if running:
        dvc("queue", "kill", *running, check=False)
    if queued:
        dvc("queue", "remove", *queued, check=False)


WORKER_EXIT_WAIT = 60.0  # seconds: a DVC worker whose queue has emptied shuts down about 10 s later


def wait_for_idle_workers(timeout: float = WORKER_EXIT_WAIT, poll: float = 1.0) -> bool:
    """Wait until no DVC queue worker process is alive (at most ``timeout`` s); whether none is.

    A worker whose queue has emptied shuts itself down about 10 s after its last task; an experiment queued in
    that window is received by the closing worker and lost with it ("monitor: shutting down due to empty
    queue", then "Task ... received", "Got shutdown from remote": seen in the structured study, where the
    next experiment is queued seconds after the last one finished). So a run queues only once the last
    worker has gone; one that outlives ``timeout`` (someone else's busy worker) is left to wait_for_queue."""
    deadline = time.monotonic() + timeout
    while queue_alive([]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def run_names(experiment: str) -> dict[str, int]:
    from mlflow.tracking import MlflowClient  # heavy optional dependency: only when reading MLflow

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    counts: dict[str, int] = {}
    for r in finished_pipeline_runs(client, [exp.experiment_id]):  # a run left RUNNING is no result
        names = [r.data.tags.get("dvc_exp_name", "")]
        names += [a for a in r.data.tags.get(ALIASES_TAG, "").split(",") if a]
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


def run_grid(grid: list[tuple], extra: list[str], jobs: int, prefix: str, experiment: str,
             log=lambda m: print(m, flush=True)) -> tuple[dict, dict[str, str], dict[str, int], float]:
    """Queue one DVC experiment per grid point and run the queue; return (point -> experiment name,
    experiment name -> queue status, experiment name -> number of FINISHED MLflow runs, seconds).

    A point is ``(seed, ratio)`` or ``(seed, ratio, sets)`` with ``sets`` a tuple of ``key=value`` overrides
    of that point alone (``extra`` applies to every point). Two phases: first one experiment per seed
    (each trains that seed's teacher), then the rest, which restore their teacher from the run-cache."""
    busy = [str(s.get("name")) for s in queue_status() if s.get("status") in ("Queued", "Running")]
    if busy:  # someone else's experiments, or stale entries of a stopped sweep: waiting on them could hang
        raise SystemExit(f"error: DVC's queue already holds {len(busy)} queued or running experiment(s) "
                         f"({', '.join(busy[:5])}); wait for them (`dvc queue status`), or clear the entries of a "
                         "stopped run (`dvc queue kill <name>`, `dvc queue remove --queued`), then rerun")
    first_per_seed: dict[int, tuple] = {}
    for g in grid:
        first_per_seed.setdefault(g[0], g)
    phases = [list(first_per_seed.values()), [g for g in grid if g not in first_per_seed.values()]]
    names: dict[tuple, str] = {}
    t0 = time.time()
    for i, phase in enumerate(phases, 1):
        if not phase:
            continue
        wait_for_idle_workers()  # the last phase's (or run's) worker may still be closing: it would take the task
        for point in phase:
            seed, ratio, sets = point[0], point[1], (point[2] if len(point) > 2 else ())
            name = f"{prefix}-r{ratio:g}-s{seed}-{int(t0)}".replace(".", "p")
            if len(grid) > len({g[:2] for g in grid}):  # several points share (seed, ratio): number them
                name += f"-{grid.index(point)}"
            dvc("exp", "run", "--queue", "--name", name, "-S", f"prune.ratio={ratio}", "-S", f"seed={seed}",
                *extra, *(a for s in sets for a in ("-S", s)))
            names[point] = name
        n_jobs = min(jobs, len(phase))
        log(f"phase {i}: {len(phase)} experiments queued, starting {n_jobs} worker(s)")
        start_workers(n_jobs)
        wait_for_queue(log=log)
    status = {s.get("name"): str(s.get("status")) for s in queue_status()}
    return names, status, run_names(experiment), time.time() - t0
