"""A study: a preset's planned grid of experiments, run in resumable parts, and its analysis.

  python -m kdprune study [--preset study-fashion] [--part-minutes 80] [-j 1]   # run (or resume) one part
  python -m kdprune study --analyse                                            # tables and frontier only
  python -m kdprune study --plan                                               # list the experiments, done or not

The plan is the preset's ``study`` section (presets/study-fashion.yaml): ``records`` (the per-run CSV), and
``cells``, each with ``ratios``, ``seeds``, optional ``set`` (overrides) and ``grid`` (every combination of
the listed values), then ``frontier`` (budgets, methods, seeds, tolerance: a bisection between the cells'
smallest and largest ratio, kdprune/frontier.py). Every experiment is params.yaml + the preset's params +
its cell's overrides + its ratio and seed; all are validated before anything runs.

Resume: an experiment is done when a finished run with its params is in MLflow or in the records CSV
(committed after each part, so a fresh clone with an empty ``mlflow.db`` resumes too). A run counts for
an experiment whose ``distill.variants`` it includes (each variant trains independently from the same
seed), so a cell never retrains what the core grid already ran. A part runs the missing experiments in
plan order, one queued DVC experiment at a time, and starts no new one after ``--part-minutes``; the
records file is rewritten after every experiment. The frontier's probes run the same way, one seed at a time
(a ratio becomes a probe once every seed has a run). A part killed mid-experiment loses that experiment only.

The analysis (metrics/study.md, metrics/study.csv; metrics/frontier.*, plots/frontier.png) reads the runs
from MLflow and the records alike.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import pandas as pd

from kdprune.experiments import queue
from kdprune.experiments.frontier_search import MAX_PROBES, Probe, next_probes, search
from kdprune.experiments.runs import FrontierError
from kdprune.experiments.study_analysis import analyse
from kdprune.experiments.frontier_axis import AXES, Axis
from kdprune.experiments.study_plan import (Choice, Experiment, Plan, StudyError, cell_experiment,
                                            frontier_experiments, frontier_range, load, load_plan, resolve, run_for,
                                            study_probes)
from kdprune.tracking.store import tracking_uri
from kdprune.tracking.summary import log_summary, reports_experiment

class PartOver(Exception):
    pass


def clock() -> float:
    return time.time()


def run_part(plan: Plan, minutes: float, jobs: int, uri: str, log=lambda m: print(m, flush=True)) -> bool:
    """Run missing experiments in plan order until the part's time is up; True when the plan is complete. A cell
    whose values an earlier cell chooses joins the plan as soon as that cell's runs are in (``resolve``)."""
    t0 = clock()

    def run_one(e: Experiment) -> pd.DataFrame:
        """Run ``e`` as one queued DVC experiment; the runs afterwards (records rewritten)."""
        log(f"study: {e.describe()}")
        names, _, _, seconds = queue.run_grid([(e.seed, e.ratio, e.sets())], [], jobs, f"study-{e.cell}",
                                              plan.experiment, log)
        runs = load(plan, uri)
        ok = run_for(plan, runs, e) is not None
        log(f"study: {'done' if ok else 'FAILED (see dvc queue logs ' + ', '.join(names.values()) + ')'} "
            f"in {seconds:.0f} s")
        if not ok:
            failed.add(repr(e))
        return runs

    failed: set[str] = set()  # repr of the experiments that failed: not retried in this part
    runs = load(plan, uri)
    plan = resolve(plan, runs)
    todo = [e for e in plan.experiments if run_for(plan, runs, e) is None]
    log(f"study {plan.name}: {len(plan.experiments) - len(todo)} of {len(plan.experiments)} experiments done"
        + (f", {len(plan.pending)} cell(s) waiting for choices" if plan.pending else "")
        + f"; this part runs at most {minutes:g} minutes")
    while True:
        plan = resolve(plan, runs)
        e = next((e for e in plan.experiments if repr(e) not in failed and run_for(plan, runs, e) is None), None)
        if e is None:
            break
        if clock() - t0 > minutes * 60:
            log(f"study: the part's {minutes:g} minutes are up; rerun the same command to resume")
            return False
        for cell, made in plan.choices.items():
            if e.cell == cell:
                log(f"study: cell {cell} runs at {', '.join(describe_choice(c) for c in made.values())}")
                break
        runs = run_one(e)
    if failed or plan.pending:
        log(f"study: {len(failed)} experiment(s) failed in this part; "
            + (f"waiting: {'; '.join(f'{c} {why}' for c, why in plan.pending.items())}; " if plan.pending else "")
            + "rerun to retry (see dvc queue logs)")
        return False
    # the frontier probes: bisection between the cells' range, on the frontier's seeds, along each axis in turn
    fr = plan.frontier

    def run_batch(axis: Axis):
        def run(ratios: list[float]) -> list[Probe]:
            # one experiment at a time, seed by seed, like the cells: the part stops on time between two of them
            # (a batch of 5 seeds x 2 ratios is ~3 h here), the records are rewritten after each, and a resumed
            # part skips the seeds already run (a ratio is a probe once every seed has a run)
            runs = load(plan, uri)
            for e in frontier_experiments(plan, ratios):
                if run_for(plan, runs, e) is not None:
                    continue
                if clock() - t0 > minutes * 60:
                    raise PartOver
                runs = run_one(e)
            return study_probes(plan, runs, axis=axis)
        return run

    lo, hi = frontier_range(plan)
    try:
        for name in fr["axes"]:
            axis = AXES[name]
            search(run_batch(axis), study_probes(plan, load(plan, uri), axis=axis), fr["methods"], fr["budgets"],
                   lo, hi, fr["tolerance"], MAX_PROBES, log,
                   prune_method=str({**plan.base, **cell_experiment(plan).flat}["prune.method"]), axis=axis)
    except PartOver:
        log(f"study: the part's {minutes:g} minutes are up during the frontier search; rerun to resume")
        return False
    return True


def frontier_todo(plan: Plan, runs: pd.DataFrame) -> dict[str, list[float]]:
    """Per axis, the ratios the search would probe next from the runs so far (its next round; [] where every
    bracket is within the tolerance on that axis). More rounds may follow once those probes are in."""
    fr, (lo, hi) = plan.frontier, frontier_range(plan)
    return {name: next_probes(study_probes(plan, runs, axis=AXES[name]), fr["methods"], fr["budgets"], lo, hi,
                              fr["tolerance"]) for name in fr["axes"]}


def describe_choice(c: Choice) -> str:
    return f"{c.key}={c.value} (chosen in {c.ref.cell} on train_acc_{c.ref.by}: {c.score:.2f} %)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="study-fashion", help="the preset whose study section is the plan")
    ap.add_argument("--part-minutes", type=float, default=80.0,
                    help="start no new experiment after this many minutes (default 80; one may still finish)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers (default 1)")
    ap.add_argument("--analyse", action="store_true", help="train nothing: write the tables from the runs so far")
    ap.add_argument("--plan", action="store_true", help="list the planned experiments and which are done")
    ap.add_argument("--no-mlflow-summary", action="store_true", help="don't log the outputs as an MLflow run")
    args = ap.parse_args(argv)
    try:
        if not (0 < args.part_minutes <= 24 * 60) or math.isnan(args.part_minutes):
            raise StudyError(f"--part-minutes {args.part_minutes}: allowed (0, 1440]")
        if not 1 <= args.jobs <= 64:
            raise StudyError(f"-j {args.jobs}: allowed 1 to 64")
        plan = load_plan(args.preset)
        uri = tracking_uri()
        if args.plan:
            runs = load(plan, uri)
            plan = resolve(plan, runs)
            for cell, made in plan.choices.items():
                print(f"chosen    {cell}: {', '.join(describe_choice(c) for c in made.values())}")
            for e in plan.experiments:
                r = run_for(plan, runs, e)
                print(f"{'done ' + str(r['run_id'])[:8] if r is not None else 'todo    '}  {e.describe()}")
            for c in plan.cells:
                if c.name in plan.pending:
                    print(f"pending   {c.name}: {len(c.seeds) * len(c.ratios) * math.prod(map(len, c.grid.values()))} "
                          f"experiment(s); {plan.pending[c.name]}")
            if plan.frontier["cell"] in plan.pending or any(run_for(plan, runs, e) is None for e in plan.experiments):
                print("pending   frontier: its probes come after the cells")
                return 0
            for name, ratios in frontier_todo(plan, runs).items():
                print(f"todo      frontier --axis {name}: ratios {', '.join(f'{r:g}' for r in ratios)} (the next round; "
                      "more may follow)" if ratios else f"done      frontier --axis {name}: every bracket is within "
                      f"{plan.frontier['tolerance']:g}x on the axis")
            return 0
        complete = None
        if not args.analyse:
            complete = run_part(plan, args.part_minutes, args.jobs, uri)
        runs = load(plan, uri)
        plan = resolve(plan, runs)
        text, files = analyse(plan, runs)
        print(text)
        if not args.no_mlflow_summary:
            run_id = log_summary(uri, plan.experiment, files + [plan.records], len(runs), kind="study")
            print(f"mlflow: study logged as run {run_id} (experiment '{reports_experiment(plan.experiment)}')")
        if complete is None:  # --analyse: nothing ran, so say what the records hold
            done = sum(1 for e in plan.experiments if run_for(plan, runs, e) is not None)
            print(f"study {plan.name}: {done} of {len(plan.experiments)} planned experiments done (the frontier "
                  "probes come after them)" + (f"; {len(plan.pending)} cell(s) wait for choices" if plan.pending else ""))
        else:
            print(f"study {plan.name}: {'complete' if complete else 'not complete yet: rerun to resume'}")
        return 0
    except (StudyError, FrontierError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
