"""One-command sweeps over prune ratio x seed through DVC's own experiment queue.

  python -m kdprune.sweep --ratios 0.5,0.8,0.9,0.95,0.98 --seeds 0,1 [-j 2] [-S distill.epochs=3] [--report]
  python -m kdprune.sweep --ratios ... --seeds ... --shard K/N --pull --push   # worker K of N machines

What it does, in DVC terms:
  1. ``dvc exp run --queue -S prune.ratio=R -S seed=S [-S ...]`` for every (R, S);
  2. ``dvc queue start -j N`` twice: first one experiment per seed (each trains that seed's teacher,
     in parallel across seeds), then the rest, which restore their teacher from DVC's run-cache:
     a teacher is trained once per (data, model, teacher params, seed);
  3. waits for the queue, then checks that every experiment has exactly one FINISHED MLflow run
     (matched by its DVC experiment name; a run left RUNNING by a killed `track` does not count) and
     reports any that failed or are missing;
  4. with ``--report``, runs ``python -m kdprune.report``.
Over several machines (clones sharing a DVC remote, a git remote and an MLflow server), each runs
``--shard K/N`` (its slice of the grid, see :func:`shard`), ``--pull`` first (the run-cache, records and
outputs, see kdprune/runcache.py: the teachers other workers trained are restored, not retrained) and
``--push`` last (``dvc exp push origin <its experiments>``, then the run-cache).
Each method (distill.variants) runs inside every experiment, so KD and fine-tune always share
the teacher, mask and batch order of their (ratio, seed).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from kdprune import runcache, tracking


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def queue_status() -> list[dict]:
    """DVC's queue entries ({'name', 'status', ...}); `dvc queue status` has no JSON output."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        return list(repo.experiments.celery_queue.status())


def start_workers(jobs: int) -> None:
    """`dvc queue start -j N`. Its output goes to a file, not a pipe: the detached workers inherit
    the handles, and a pipe would make this call wait for them instead of wait_for_queue."""
    log = Path(".dvc/tmp/sweep-queue-start.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        r = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"error: dvc queue start failed:\n{log.read_text()}")


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


def wait_for_queue(poll: float = 5.0, lost_after: float = LOST_AFTER,
                   log=lambda m: print(m, flush=True)) -> list[dict]:
    """Wait until no experiment is Queued or Running, and return the queue's entries.

    DVC's worker can exit with a task unfinished: its monitor stops it when an inspect call finds no task in
    time (seen here under load: the task stayed 'Running' with no process for 20 minutes, and a plain wait
    never ends; treeverse/dvc-task#77, treeverse/dvc#8165). So when tasks stay pending while no worker and
    none of their experiments' processes has been alive for ``lost_after`` seconds: queued tasks get a
    fresh worker, once; after that, or for a task left 'Running', the tasks are removed from the queue and
    named in the log. The caller then finds no result for them and reports them as failed; a study or a
    frontier search reruns them on its next run (nothing is recorded for them)."""
    dead_since: float | None = None
    restarted = False
    while True:
        status = queue_status()
        pending = [s for s in status if s.get("status") in ("Queued", "Running")]
        if not pending:
            return status
        if queue_alive([str(s.get("rev")) for s in pending]):
            dead_since = None
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
                dvc("queue", "remove", *(str(s.get("rev")) for s in pending), check=False)
                return queue_status()
        time.sleep(poll)


def parse_list(text: str, cast) -> list:
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: cannot parse {text!r} as a comma-separated list of {cast.__name__}") from None


SHARD_MAX = 1000  # more workers than any team's machines; bounds the slice arithmetic


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N <= SHARD_MAX, else a one-line error."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 4 for p in parts):
        raise SystemExit(f"error: --shard {text!r} is invalid: use K/N with integers 1 <= K <= N <= {SHARD_MAX} "
                         "(e.g. 2/4 = the second of four workers)")
    k, n = int(parts[0]), int(parts[1])
    if not 1 <= k <= n <= SHARD_MAX:
        raise SystemExit(f"error: --shard {text!r} is invalid: use K/N with integers 1 <= K <= N <= {SHARD_MAX} "
                         "(e.g. 2/4 = the second of four workers)")
    return k, n


def shard(grid: list[tuple[int, float]], k: int, n: int) -> list[tuple[int, float]]:
    """The K-th of N deterministic, disjoint slices of the (seed, ratio) grid; together they are the grid.

    With at least N seeds, whole seeds go round-robin (sorted) to the shards, so a seed's teacher is needed
    on one worker only. With fewer seeds than workers, the sorted grid points go round-robin: a seed's
    experiments then span workers, and the later ones restore its teacher from the pulled run-cache
    (``--pull``) when the worker that trained it has pushed (``--push``)."""
    points = sorted(set(grid))
    seeds = sorted({s for s, _ in points})
    if len(seeds) >= n:
        mine = set(seeds[k - 1::n])
        return [g for g in points if g[0] in mine]
    return points[k - 1::n]


def sync_run_cache(cmd: str) -> int:
    try:
        return runcache.sync(cmd)
    except runcache.RunCacheError as e:
        raise SystemExit(f"error: {e}") from None


def run_names(experiment: str) -> dict[str, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    counts: dict[str, int] = {}
    for r in tracking.finished_pipeline_runs(client, [exp.experiment_id]):  # a run left RUNNING is no result
        names = [r.data.tags.get("dvc_exp_name", "")]
        names += [a for a in r.data.tags.get(tracking.ALIASES_TAG, "").split(",") if a]
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


def check_sets(sets: list[str], params_path: Path = Path("params.yaml")) -> tuple[str, list[str]]:
    """The MLflow experiment and the ``-S`` arguments for the sweep's ``key=value`` overrides, checked before
    anything is queued (exit 2 with one line): params.yaml + the overrides must validate, the values must
    reach DVC unchanged (no sweep, no interpolation: kdprune/overrides.py), and ratio and seed are the
    sweep's own."""
    from kdprune import overrides
    from kdprune.frontier import MAX_SETS
    from kdprune.params import ParamsError, params_from_dict, safe_load_yaml
    from kdprune.presets import merge

    try:
        if len(sets) > MAX_SETS:
            raise overrides.OverrideError(f"at most {MAX_SETS} overrides")
        values = dict(overrides.parse(s) for s in sets)
        for key in ("prune.ratio", "seed"):
            if key in values:
                raise overrides.OverrideError(f"{key}: the sweep sets it (--ratios, --seeds)")
        base = safe_load_yaml(params_path.read_text())
        extra = overrides.dvc_args(base, values)
        params = params_from_dict(merge(base, overrides.nest(values)))
    except (overrides.OverrideError, ParamsError) as e:
        print(f"error: -S {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return params.mlflow.experiment, extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", required=True, help="comma-separated prune.ratio values")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers (default 1)")
    ap.add_argument("-S", "--set-param", action="append", default=[],
                    help="key=value override for every experiment (the value read as YAML; repeatable)")
    ap.add_argument("--report", action="store_true", help="run python -m kdprune.report afterwards")
    ap.add_argument("--shard", default="1/1", help="K/N: run only the K-th of N slices of the grid (one per machine)")
    ap.add_argument("--pull", action="store_true",
                    help="first pull the run-cache, records and outputs (reuse other workers' stages)")
    ap.add_argument("--push", action="store_true",
                    help="last `dvc exp push <--git-remote> <experiments>`, then push the run-cache")
    ap.add_argument("--git-remote", default="origin", help="git remote for --push (default origin)")
    args = ap.parse_args(argv)
    k, n = parse_shard(args.shard)
    ratios = parse_list(args.ratios, float)
    seeds = parse_list(args.seeds, int)
    experiment, extra = check_sets(args.set_param)
    grid = shard([(s, r) for s in seeds for r in ratios], k, n)
    if not grid:
        print(f"sweep: shard {k}/{n} of a {len(seeds)} x {len(ratios)} grid is empty; nothing to run")
        return 0
    if n > 1:
        print(f"sweep: shard {k}/{n}: {len(grid)} of {len(seeds) * len(ratios)} experiments: "
              + ", ".join(f"ratio {r:g} seed {s}" for s, r in grid), flush=True)
    if args.pull:
        print(f"sweep: pulled the run-cache ({sync_run_cache('pull')} outputs named)", flush=True)
    names, status, counts, seconds = run_grid(grid, extra, args.jobs, "sweep", experiment)
    failed = [n for n in names.values() if status.get(n) == "Failed"]
    missing = [n for n in names.values() if counts.get(n, 0) == 0 and n not in failed]
    dup = [n for n in names.values() if counts.get(n, 0) > 1]
    print(f"sweep: {len(names)} experiments in {seconds:.0f} s; MLflow runs found for "
          f"{sum(1 for n in names.values() if counts.get(n, 0) >= 1)}; failed: {failed or 'none'}; "
          f"missing: {missing or 'none'}; duplicated: {dup or 'none'}")
    if failed:
        print("see `dvc queue logs <name>` for a failed experiment's output", file=sys.stderr)
    if args.push:
        done = [nm for nm in names.values() if status.get(nm) == "Success"]
        if done:
            dvc("exp", "push", args.git_remote, *done)
        print(f"sweep: dvc exp push {args.git_remote} ({len(done)} experiments); pushed the run-cache "
              f"({sync_run_cache('push')} outputs named)", flush=True)
    if args.report:
        from kdprune import report

        report.main([])
    return 1 if (failed or missing or dup) else 0


if __name__ == "__main__":
    sys.exit(main())
