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
import sys

from kdprune.experiments import report, runcache
from kdprune.experiments.args import (MAX_GRID, check_git_remote, check_sets, parse_jobs, parse_ratios, parse_seeds,
                                      parse_shard)
from kdprune.experiments.runs import FrontierError
from kdprune.experiments.queue import dvc, run_grid

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
    try:  # every argument, before anything is pulled or queued
        k, n = parse_shard(args.shard)
        ratios = parse_ratios(args.ratios)
        seeds = parse_seeds(args.seeds)
        parse_jobs(args.jobs)
        check_git_remote(args.git_remote)
        if len(ratios) * len(seeds) > MAX_GRID:
            raise FrontierError(f"--ratios x --seeds: {len(ratios)} x {len(seeds)} = {len(ratios) * len(seeds)} "
                                f"experiments; a sweep runs at most {MAX_GRID}")
    except FrontierError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    experiment, extra = check_sets(args.set_param, ratios=ratios)
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
        report.main([])
    return 1 if (failed or missing or dup) else 0


if __name__ == "__main__":
    sys.exit(main())
