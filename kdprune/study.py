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
import itertools
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdprune import frontier as F
from kdprune import io
from kdprune.params import ParamsError, flatten, params_from_dict, safe_load_yaml

MAX_EXPERIMENTS = 2000
MAX_LIST = 64
CELL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
FORBIDDEN = ("prune.ratio", "seed")
# a budget, not a choice: a longer schedule is expected to fit the training data better, so a check along it
# reports the trend and chooses no setting
BUDGET_KEYS = frozenset({"distill.epochs"})


class StudyError(ValueError):
    """A bad study plan or option; the message names the preset file and key (exit 2)."""


@dataclass(frozen=True)
class Experiment:
    cell: str
    seed: int
    ratio: float
    overrides: tuple[tuple[str, Any], ...]  # flat key -> value, beyond params.yaml (preset params included)

    @property
    def flat(self) -> dict[str, Any]:
        return dict(self.overrides)

    def sets(self) -> tuple[str, ...]:
        from kdprune.overrides import override

        return tuple(override(k, v) for k, v in self.overrides)

    def describe(self) -> str:
        own = {k: v for k, v in self.overrides if not k.startswith(("mlflow.", "evaluate."))}
        return f"{self.cell}: ratio {self.ratio:g} seed {self.seed} " + " ".join(f"{k}={v}" for k, v in own.items())


@dataclass
class Plan:
    name: str
    path: Path
    records: Path
    experiments: list[Experiment]
    frontier: dict[str, Any]
    experiment: str  # the MLflow experiment
    base: dict[str, Any]  # params.yaml + the preset's params, flat
    grids: dict[str, list[str]]  # cell -> the keys its grid varies


def _list(raw: Any, where: str, cast, check=lambda v: True, allowed: str = "") -> list:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_LIST:
        raise StudyError(f"{where}: expected a list of 1 to {MAX_LIST} values, got {str(raw)[:80]!r}")
    out = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not check(v):
            raise StudyError(f"{where}: {str(v)[:40]!r} is not allowed ({allowed})")
        out.append(cast(v))
    if len(set(out)) != len(out):
        raise StudyError(f"{where}: values repeat")
    return out


def load_plan(name: str, params_path: Path = Path("params.yaml")) -> Plan:
    from kdprune import overrides, presets

    try:
        raw = presets.load_preset(name)
    except presets.PresetError as e:
        raise StudyError(str(e)) from None
    path = presets.PRESETS / f"{name}.yaml"
    study = raw.get("study")
    if not isinstance(study, dict):
        raise StudyError(f"{path}: no 'study' section (a plan of cells); see presets/study-fashion.yaml")
    extra = set(study) - {"records", "cells", "frontier"}
    if extra:
        raise StudyError(f"{path}: study: unknown keys {sorted(extra)}; allowed: records, cells, frontier")
    records = study.get("records", "metrics/study_runs.csv")
    if not isinstance(records, str) or not re.fullmatch(r"metrics/[A-Za-z0-9_.-]{1,80}\.csv", records):
        raise StudyError(f"{path}: study.records {str(records)[:80]!r}: must be metrics/<name>.csv")
    params_raw = safe_load_yaml(params_path.read_text())
    try:  # DVC would resolve a ${...} (reading environment variables into params.yaml, git and MLflow)
        overrides.check_no_interpolation(params_raw, str(params_path))
        overrides.check_no_interpolation(raw, str(path))
    except overrides.OverrideError as e:
        raise StudyError(str(e)) from None
    base_raw = presets.merge(params_raw, raw["params"])
    base = flatten(base_raw)
    preset_flat = flatten(raw["params"])
    cells = study.get("cells")
    if not isinstance(cells, list) or not cells:
        raise StudyError(f"{path}: study.cells must be a non-empty list")
    experiments: list[Experiment] = []
    grids: dict[str, list[str]] = {}
    seen: set[str] = set()
    checked: set[str] = set()  # override sets already verified against DVC's parser
    for i, cell in enumerate(cells):
        where = f"{path}: study.cells[{i}]"
        if not isinstance(cell, dict) or set(cell) - {"name", "ratios", "seeds", "set", "grid"}:
            raise StudyError(f"{where}: a mapping with name, ratios, seeds, and optional set and grid")
        cname = cell.get("name")
        if not isinstance(cname, str) or not CELL_NAME.match(cname) or cname in seen:
            raise StudyError(f"{where}.name {str(cname)[:40]!r}: a unique name of lower-case letters, digits, _")
        seen.add(cname)
        ratios = _list(cell.get("ratios"), f"{where}.ratios", float, lambda v: 0 < v < 1, "0 < ratio < 1")
        seeds = _list(cell.get("seeds"), f"{where}.seeds", int,
                      lambda v: isinstance(v, int) and 0 <= v < 2 ** 32, "integers in [0, 2^32)")
        sets = cell.get("set", {}) or {}
        grid = cell.get("grid", {}) or {}
        if not isinstance(sets, dict) or not isinstance(grid, dict) or len(sets) + len(grid) > MAX_LIST:
            raise StudyError(f"{where}: set and grid must be mappings of dotted param keys")
        for key in [*sets, *grid]:
            if key in FORBIDDEN or not isinstance(key, str) or key not in base:
                raise StudyError(f"{where}: key {str(key)[:60]!r} is not allowed (a params.yaml key other than "
                                 f"{', '.join(FORBIDDEN)}, which ratios and seeds set)")
        for key, values in grid.items():
            if not isinstance(values, list) or not 1 <= len(values) <= 16:
                raise StudyError(f"{where}.grid.{key}: a list of 1 to 16 values")
        grids[cname] = list(grid)
        combos = [dict(zip(grid, c)) for c in itertools.product(*grid.values())] or [{}]
        for seed in seeds:
            for ratio in ratios:
                for combo in combos:
                    over = {**preset_flat, **sets, **combo}
                    flat = {**base, **over, "prune.ratio": ratio, "seed": seed}
                    try:
                        params_from_dict(F.nest(flat))
                    except ParamsError as e:
                        raise StudyError(f"{where} (ratio {ratio}, seed {seed}, {combo}): {e}") from None
                    if repr(sorted(over.items())) not in checked:  # DVC must read back exactly these values
                        try:
                            overrides.dvc_args({}, over)
                        except overrides.OverrideError as e:
                            raise StudyError(f"{where}: {e}") from None
                        checked.add(repr(sorted(over.items())))
                    experiments.append(Experiment(cname, seed, ratio, tuple(sorted(over.items()))))
                    if len(experiments) > MAX_EXPERIMENTS:
                        raise StudyError(f"{path}: more than {MAX_EXPERIMENTS} experiments planned")
    fr = study.get("frontier") or {}
    if not isinstance(fr, dict) or set(fr) - {"budgets", "methods", "seeds", "tolerance", "lo", "hi", "cell"}:
        raise StudyError(f"{path}: study.frontier: a mapping with budgets, methods, seeds, tolerance, lo, hi, cell")
    fcell = fr.get("cell", experiments[0].cell)
    if fcell not in seen or grids.get(fcell):
        raise StudyError(f"{path}: study.frontier.cell {str(fcell)[:40]!r}: one of the cells {sorted(seen)} without "
                         "a grid (its params are every probe's)")
    try:
        frontier = {"budgets": F.parse_floats(",".join(map(str, fr.get("budgets", [1.0]))), "budgets", 0, 100),
                    "methods": F.parse_methods(",".join(map(str, fr.get("methods", ["kd", "finetune"])))),
                    "seeds": F.parse_seeds(",".join(map(str, fr.get("seeds", [0, 1, 2])))),
                    "tolerance": F.parse_floats(str(fr.get("tolerance", 1.5)), "tolerance", 1, 100)[0],
                    "cell": fcell}
        for end in ("lo", "hi"):  # compressions; default: the first cell's least and most compressed ratio
            if end in fr:
                frontier[end] = F.parse_floats(str(fr[end]), end, 1, 1e6)[0]
        if frontier.get("lo", 1) >= frontier.get("hi", 1e6):
            raise F.FrontierError(f"lo {frontier['lo']:g} must be below hi {frontier['hi']:g}")
    except F.FrontierError as e:
        raise StudyError(f"{path}: study.frontier: {e}") from None
    return Plan(name, path, Path(records), experiments, frontier, str(base.get("mlflow.experiment")), base, grids)


# ---------------------------------------------------------------------------------------------- progress
def target(plan: Plan, e: Experiment) -> tuple[dict[str, Any], list[str]]:
    flat = {**plan.base, **e.flat, "prune.ratio": e.ratio, "seed": e.seed}
    return flat, [str(v) for v in flat["distill.variants"]]


def run_for(plan: Plan, runs: pd.DataFrame, e: Experiment) -> pd.Series | None:
    """The newest finished run that covers ``e`` (its params, every variant of it), or None."""
    flat, variants = target(plan, e)
    m = F.matching(runs, flat, variants)
    if m.empty:
        return None
    hit = m[(m["ratio"] == round(e.ratio, 6)) & (m["seed"] == e.seed)]
    return None if hit.empty else hit.iloc[-1]


def duplicates(plan: Plan, runs: pd.DataFrame, e: Experiment) -> int:
    """How many finished runs beyond one have exactly ``e``'s params (its variants included): a result
    logged twice. (A run that *covers* ``e`` with more variants is no duplicate.)"""
    flat, variants = target(plan, e)
    m = F.matching(runs, flat, variants, newest=False)
    if m.empty:
        return 0
    same = m[(m["ratio"] == round(e.ratio, 6)) & (m["seed"] == e.seed)]
    same = same[same["params.distill.variants"].map(lambda v: F.same_value(v, variants))]
    return max(0, len(same) - 1)


def load(plan: Plan, uri: str | None) -> pd.DataFrame:
    runs = F.load_runs(plan.records, uri, plan.experiment)
    F.write_records(plan.records, runs)
    return runs


class PartOver(Exception):
    pass


def clock() -> float:
    return time.time()


def run_part(plan: Plan, minutes: float, jobs: int, uri: str, log=lambda m: print(m, flush=True)) -> bool:
    """Run missing experiments in plan order until the part's time is up; True when the plan is complete."""
    from kdprune import sweep

    t0 = clock()

    def run_one(e: Experiment) -> pd.DataFrame:
        """Run ``e`` as one queued DVC experiment; the runs afterwards (records rewritten)."""
        log(f"study: {e.describe()}")
        names, _, _, seconds = sweep.run_grid([(e.seed, e.ratio, e.sets())], [], jobs, f"study-{e.cell}",
                                              plan.experiment, log)
        runs = load(plan, uri)
        ok = run_for(plan, runs, e) is not None
        log(f"study: {'done' if ok else 'FAILED (see dvc queue logs ' + ', '.join(names.values()) + ')'} "
            f"in {seconds:.0f} s")
        return runs

    runs = load(plan, uri)
    todo = [e for e in plan.experiments if run_for(plan, runs, e) is None]
    log(f"study {plan.name}: {len(plan.experiments) - len(todo)} of {len(plan.experiments)} experiments done; "
        f"this part runs at most {minutes:g} minutes")
    for e in todo:
        if clock() - t0 > minutes * 60:
            log(f"study: the part's {minutes:g} minutes are up; rerun the same command to resume")
            return False
        runs = load(plan, uri)
        if run_for(plan, runs, e) is not None:
            continue
        runs = run_one(e)
    # the frontier probes: bisection between the cells' range, on the frontier's seeds
    fr = plan.frontier

    def run_batch(ratios: list[float]) -> list[F.Probe]:
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
        return study_probes(plan, runs)

    lo, hi = frontier_range(plan)
    try:
        F.search(run_batch, study_probes(plan, runs), fr["methods"], fr["budgets"], lo, hi, fr["tolerance"],
                 F.MAX_PROBES, log)
    except PartOver:
        log(f"study: the part's {minutes:g} minutes are up during the frontier search; rerun to resume")
        return False
    return True


def frontier_experiments(plan: Plan, ratios: list[float]) -> list[Experiment]:
    """The experiments of frontier probes at ``ratios``: the frontier cell's overrides with every frontier method
    as the variants, seed by seed like the cells: a part that runs only some of a batch (two ratios are ~3 h here)
    then needs fewer seeds' teachers, each ~15 minutes to train where the run-cache lacks it (a fresh machine)."""
    core = dict(cell_experiment(plan).overrides)
    core["distill.variants"] = plan.frontier["methods"]
    return [Experiment("frontier", s, r, tuple(sorted(core.items()))) for s in plan.frontier["seeds"] for r in ratios]


def frontier_own(plan: Plan, runs: pd.DataFrame) -> list[tuple[Experiment, pd.Series]]:
    """The frontier search's own experiments that have a finished run: the probes' params (every frontier method
    in one run) at a ratio that no cell plans, on the frontier's seeds."""
    planned = {round(e.ratio, 6) for e in plan.experiments}
    flat, methods = target(plan, frontier_experiments(plan, [0.5])[0])  # matching ignores ratio and seed
    m = F.matching(runs, flat, methods)
    ratios = [] if m.empty else sorted(float(r) for r in set(m["ratio"]) if r not in planned)
    return [(e, r) for e in frontier_experiments(plan, ratios) if (r := run_for(plan, runs, e)) is not None]


def cell_experiment(plan: Plan, cell: str | None = None) -> Experiment:
    """A cell's first experiment (default: the frontier's cell, whose params but ratio, seed and variants are
    every probe's)."""
    return next(e for e in plan.experiments if e.cell == (cell or plan.frontier["cell"]))


def frontier_cell_ratios(plan: Plan, cell: str | None = None) -> set[float]:
    """The ratios of the frontier's cell (by default the first, the core grid), which its probes extend."""
    return {e.ratio for e in plan.experiments if e.cell == (cell or plan.frontier["cell"])}


def frontier_range(plan: Plan) -> tuple[float, float]:
    """The search's range in compression: the plan's frontier.lo/hi, else the frontier cell's ratio range."""
    core = frontier_cell_ratios(plan)
    return plan.frontier.get("lo", 1 / (1 - min(core))), plan.frontier.get("hi", 1 / (1 - max(core)))


def study_probes(plan: Plan, runs: pd.DataFrame, seeds: list[int] | None = None, cell: str | None = None
                 ) -> list[F.Probe]:
    """Probes of the frontier: runs with the frontier cell's params (any ratio), on the frontier's seeds; a
    method that does not distil may come from a run of the same seed and ratio at other KD settings
    (frontier.joined), e.g. the core grid's finetune next to a kd-only cell's kd."""
    fr = plan.frontier
    return F.probes_from_runs(probe_runs(plan, runs, cell), fr["methods"], seeds or fr["seeds"])


def probe_runs(plan: Plan, runs: pd.DataFrame, cell: str | None = None) -> pd.DataFrame:
    """One row per (ratio, seed) with every frontier method, at the cell's params (frontier.joined)."""
    return F.joined(runs, {**plan.base, **cell_experiment(plan, cell).flat}, plan.frontier["methods"])


def preliminary_seeds(plan: Plan, runs: pd.DataFrame, cell: str | None = None) -> list[int]:
    """While a cell is incomplete: the frontier's seeds with a probe at every one of its ratios."""
    ratios = {round(r, 6) for r in frontier_cell_ratios(plan, cell)}
    j = probe_runs(plan, runs, cell)
    return [s for s in plan.frontier["seeds"]
            if not j.empty and ratios <= {round(float(r), 6) for r in j.loc[j["seed"] == s, "ratio"]}]


# ---------------------------------------------------------------------------------------------- analysis
def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of a - b (paired by seed), its 95 % t interval (report.t_interval) and the two-sided paired t-test
    p-value (NaN below 2 pairs)."""
    from scipy import stats

    from kdprune.report import t_interval

    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) == 0:
        return {"n": 0, "diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan")}
    mean, lo, hi = t_interval(list(d))
    p = float("nan")
    if len(d) >= 2:
        p = float(stats.ttest_1samp(d, 0.0).pvalue) if d.std(ddof=1) > 0 else (0.0 if mean else 1.0)
    return {"n": len(d), "diff": mean, "lo": lo, "hi": hi, "p": p}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count as a test)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    order = sorted(idx, key=lambda i: pvalues[i])
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def simultaneous(diffs: np.ndarray, m: int) -> tuple[float, float]:
    """A Bonferroni interval at 95 % family-wise over ``m`` tests (level 1 - 0.05 / m)."""
    from kdprune.report import t_interval

    return t_interval(list(np.asarray(diffs, float)), level=1 - 0.05 / m)[1:]


def ms(values) -> str:
    v = np.asarray(values, float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def cell_runs(plan: Plan, runs: pd.DataFrame, cell: str) -> list[tuple[Experiment, pd.Series]]:
    out = []
    for e in plan.experiments:
        if e.cell == cell:
            r = run_for(plan, runs, e)
            if r is not None:
                out.append((e, r))
    return out


def chance_level(df: pd.DataFrame) -> float | None:
    """100 / classes of the study's dataset (a built-in one), else None."""
    names = set(df.get("params.data.name", pd.Series(dtype=str)).astype(str))
    if len(names) != 1:
        return None
    from kdprune.data.registry import REGISTRY

    info = REGISTRY.get(names.pop())
    return None if info is None else 100.0 / len(info.classes)


def at_chance(g: pd.DataFrame, chance: float | None) -> int:
    """Seeds in ``g`` whose kd and finetune accuracies are both within 1 point of chance."""
    if chance is None:
        return 0
    kd, ft = g["acc_kd"].to_numpy(float), g["acc_finetune"].to_numpy(float)
    return int(((kd <= chance + 1) & (ft <= chance + 1)).sum())


def analyse(plan: Plan, runs: pd.DataFrame, out: Path = Path(".")) -> tuple[str, list[Path]]:
    """metrics/study.md + study.csv (+ the frontier files) from the runs; returns the markdown and the files."""
    lines = [f"# Study {plan.name}", "", f"Plan: {plan.path.name}; runs read from MLflow and {plan.records}.", ""]
    rows = []
    done = [(e, run_for(plan, runs, e)) for e in plan.experiments]
    got = [(e, r) for e, r in done if r is not None]
    ids = [r["run_id"] for _, r in got]
    unique_runs = len(set(ids))
    dup = sum(duplicates(plan, runs, e) for e, _ in got)
    lines += [f"Experiments planned: {len(plan.experiments)}; done: {len(got)} ({unique_runs} distinct MLflow runs: "
              "a run covers several planned experiments when their params coincide, e.g. the core grid's kd at the "
              f"default alpha and temperature); not run yet: {len(plan.experiments) - len(got)}; results logged "
              f"twice: {dup}.", ""]
    own = frontier_own(plan, runs)
    if own:
        ratios = sorted({e.ratio for e, _ in own})
        full = [r for r in ratios if sum(e.ratio == r for e, _ in own) == len(plan.frontier["seeds"])]
        lines += [f"Frontier search's own runs (probes at ratios no cell plans): {len(own)} at {len(ratios)} "
                  f"ratio(s) ({', '.join(f'{r:g}' for r in ratios)}); complete probes (every seed): {len(full)}; "
                  f"results logged twice: {sum(duplicates(plan, runs, e) for e, _ in own)}.", ""]
    if got or own:
        wall = sum((float(r["end_time"]) - float(r["start_time"])) / 1000 for r in
                   {r["run_id"]: r for _, r in got + own}.values() if str(r.get("end_time", "")) not in ("", "nan"))
        which = "those runs and the search's" if own else "those runs"
        lines += [f"Pipeline wall time summed over {which} (MLflow start to end, each the real pipeline time): "
                  f"{wall / 3600:.2f} h.", ""]
    core_cell = plan.experiments[0].cell
    core = cell_runs(plan, runs, core_cell)
    if core:
        df = pd.DataFrame([{**r.to_dict(), "ratio": e.ratio, "seed": e.seed} for e, r in core])
        lines += kd_ft_table(df, f"## Core grid: kd vs finetune ({core_cell})", "core", rows,
                             "KD − FT is paired by seed (same teacher, mask and batch order)")
    choices: dict[str, dict] = {}
    for cell in dict.fromkeys(e.cell for e in plan.experiments[1:] if e.cell != core_cell):
        res = cell_runs(plan, runs, cell)
        if not res:
            lines += [f"## {cell}", "", "No finished runs yet.", ""]
        elif borrows_finetune(plan, cell):
            lines += paired_cell(plan, cell, res, core, rows, choices)
        else:
            lines += section(plan, cell, res, core, rows, choices)
    fr = plan.frontier
    cell = fr["cell"]
    probes, seeds, note = study_probes(plan, runs), fr["seeds"], ""
    if len(probes) < 2:  # the study is still running: a preliminary frontier on the seeds complete so far, from
        # the frontier's cell, or from the core grid while that has more complete seeds (kd at other settings)
        own = preliminary_seeds(plan, runs)
        cell, seeds = fr["cell"], own
        if cell != core_cell and len(core_seeds := preliminary_seeds(plan, runs, core_cell)) > len(own):
            cell, seeds = core_cell, core_seeds
        probes = study_probes(plan, runs, seeds, cell) if seeds else []
        done = f"for seed(s) {', '.join(map(str, own))} only" if own else "for no seed yet"
        which = (f"only seed(s) {', '.join(map(str, seeds))} of {len(fr['seeds'])} have finished every ratio of the "
                 f"{cell} cell" if cell == fr["cell"] else
                 f"the frontier's own cell, {fr['cell']}, has every ratio done {done}, so this is the "
                 f"{cell} cell's frontier on seed(s) {', '.join(map(str, seeds))}")
        note = (f" PRELIMINARY: {which}; the search has not run yet"
                + ("" if len(seeds) > 1 else ", and one seed gives no interval") + ".")
    core_ratios = frontier_cell_ratios(plan, cell)
    if len(probes) >= 2 and not note and all(any(math.isclose(p.ratio, r) for r in core_ratios) for p in probes):
        note = (f" Not searched yet: every probe is one of the {cell} cell's ratios, so each frontier point is "
                "interpolated between them; the bisection's own probes will move it.")
    files = [out / "metrics" / "study.md", out / "metrics" / "study.csv"]
    if len(probes) >= 2:
        kd = fmt_kd(kd_settings_of(plan, cell))
        ffiles, fronts = F.write_outputs(out, probes, fr["methods"], fr["budgets"],
                                         f"{plan.name}: {F.plural_seeds(len(seeds))}, kd at {kd}"
                                         + (" (preliminary)" if note else ""), prefix="frontier")
        teacher = float(np.mean([p.teacher.mean() for p in probes]))
        lines += ["## Frontier", "", *[f"- {F.headline(fronts, teacher, b)}" for b in fr["budgets"]], "",
                  f"From {len(probes)} probes (metrics/frontier.md has the table, plots/frontier.png the plot; the "
                  f"bracket is a 95 % seed-bootstrap interval). The probes run the {cell} cell's params: kd "
                  f"at {kd}; a probe's finetune may come from the run of the same seed and ratio at other KD "
                  f"settings (fine-tuning reads none of them), when both report the same teacher and compression."
                  f"{note}", "", F.teachers_note(probes), ""]
        files += ffiles
    text = "\n".join(lines) + "\n"
    io.write_text(files[0], text)
    io.write_text(files[1], pd.DataFrame(rows).to_csv(index=False))
    return text, files


def kd_ft_table(df: pd.DataFrame, heading: str, name: str, rows: list, pairing: str) -> list[str]:
    """KD − FT per ratio, paired by seed: Bonferroni intervals and Holm p-values over the ratios tested. ``df``:
    one row per (ratio, seed) with acc_kd, acc_finetune, acc_teacher, acc_pruned, compression_ratio."""
    lines: list[str] = []
    ratios = sorted(df["ratio"].unique())
    stats_ = []
    for ratio in ratios:
        g = df[df["ratio"] == ratio].sort_values("seed")
        stats_.append((ratio, g, paired(g["acc_kd"].to_numpy(float), g["acc_finetune"].to_numpy(float))))
    adj = holm([s[2]["p"] for s in stats_])
    m = sum(1 for s in stats_ if s[2]["n"] >= 2)
    teacher = df.drop_duplicates("seed")["acc_teacher"].astype(float)
    lines += ([heading, ""] if heading else []) + [
              f"Teacher: {ms(teacher)} % over {F.plural_seeds(len(teacher))} (one teacher per seed). Test "
              f"accuracy %, mean ± std over seeds. {pairing}; "
              + (f"the 95 % interval is Bonferroni-adjusted for the {m} ratio{'s' if m != 1 else ''} tested (family-wise "
                 "95 %), and the "
                 "p-value (paired t) Holm-adjusted." if m else "intervals and tests need 2 seeds at a ratio."), "",
              "| ratio | compression | MACs / | no recovery | finetune | kd | n | at chance | KD − FT (pt) "
              "| 95 % CI (adj.) | Holm p | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    chance = chance_level(df)
    collapsed_total = 0
    for (ratio, g, p), ap in zip(stats_, adj):
        lo, hi = simultaneous(g["acc_kd"].to_numpy(float) - g["acc_finetune"].to_numpy(float), max(m, 1))
        verdict = ("-" if math.isnan(ap) else "KD better" if ap < 0.05 and p["diff"] > 0 else
                   "FT better" if ap < 0.05 else "no significant difference")
        ci = "-" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
        mac = g["mac_reduction"].astype(float).mean() if "mac_reduction" in g else float("nan")
        collapsed = at_chance(g, chance)
        collapsed_total += collapsed
        lines.append(f"| {ratio:g} | {g['compression_ratio'].astype(float).mean():.1f}x | {mac:.1f}x | "
                     f"{ms(g['acc_pruned'])} | {ms(g['acc_finetune'])} | {ms(g['acc_kd'])} | {p['n']} | "
                     f"{'-' if chance is None else collapsed} | "
                     f"{p['diff']:+.2f} | {ci} | {'-' if math.isnan(ap) else f'{ap:.3g}'} | {verdict} |")
        rows.append({"section": name, "ratio": ratio, "n": p["n"], "kd_mean": g["acc_kd"].mean(),
                     "finetune_mean": g["acc_finetune"].mean(), "kd_minus_finetune": p["diff"],
                     "ci95_adj_low": lo, "ci95_adj_high": hi, "p": p["p"], "p_holm": ap,
                     "seeds_at_chance": collapsed})
    lines.append("")
    if chance is not None:
        lines += [f"At chance: seeds whose kd and finetune students both end within 1 point of chance "
                  f"({chance:.2f} %). Neither method could train them: pruning left no signal path (a layer "
                  "with almost no weights, the layer collapse of global magnitude pruning at extreme sparsity). "
                  f"They count in the means and pairs above (their KD − FT is ~0); {collapsed_total} so far.", ""]
    return lines


def kd_settings_of(plan: Plan, cell: str) -> dict[str, Any]:
    """The KD settings (F.KD_KEYS; at_beta only when used) a cell without a grid runs at."""
    flat = {**plan.base, **cell_experiment(plan, cell).flat}
    return {k: flat[k] for k in sorted(F.KD_KEYS) if k in flat and not (k == "distill.at_beta" and not flat[k])}


def fmt_kd(kd: dict[str, Any]) -> str:
    """alpha 0.5, temperature 2"""
    return ", ".join(f"{k.split('.')[-1]} {v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else f"{k.split('.')[-1]} {v}" for k, v in kd.items())


def borrows_finetune(plan: Plan, cell: str) -> bool:
    """A cell without a grid that runs kd but not finetune, and whose params differ from the core grid's only in
    the KD settings: its KD − FT pairs with the core grid's finetune of the same seed and ratio."""
    if plan.grids.get(cell):
        return False
    e = next(x for x in plan.experiments if x.cell == cell)
    flat, variants = target(plan, e)
    core, _ = target(plan, plan.experiments[0])
    rest = lambda d: {k: v for k, v in d.items() if k not in F.KD_KEYS | {"distill.variants"}}  # noqa: E731
    return "kd" in variants and "finetune" not in variants and rest(flat) == rest(core)


def core_finetune(core, e: Experiment, r: pd.Series) -> float | None:
    """The core grid's finetune accuracy for ``e``'s seed and ratio, when that run reports the same teacher
    accuracy and compression as ``r`` (the same teacher and mask); else None."""
    c = next((c for x, c in core if (x.seed, x.ratio) == (e.seed, e.ratio)), None)
    if c is None or pd.isna(c.get("acc_finetune")) or not F.same_teacher_and_mask(
            c["acc_teacher"], c["compression_ratio"], r["acc_teacher"], r["compression_ratio"]):
        return None
    return float(c["acc_finetune"])


def paired_cell(plan: Plan, cell: str, res, core, rows: list, choices: dict[str, dict]) -> list[str]:
    """A kd-only cell at other KD settings than the core grid's, over ratios and seeds: the per-ratio KD − FT
    table of the core grid (Holm), with each seed's finetune from the core grid's run of the same seed and ratio.
    A pair is used only when both runs report the same teacher accuracy and compression (same teacher, mask)."""
    pairs, unpaired = [], 0
    for e, r in res:
        ft = core_finetune(core, e, r)
        if ft is None:
            unpaired += 1
            continue
        pairs.append({**r.to_dict(), "acc_finetune": ft, "ratio": e.ratio, "seed": e.seed})
    kd = kd_settings_of(plan, cell)
    lines = [f"## {cell}: kd at {fmt_kd(kd)} vs finetune", ""]
    for source, choice in choices.items():
        if set(choice) <= set(kd):
            same = all(F.same_value(str(kd[k]), v) for k, v in choice.items())
            chosen = fmt_setting(list(choice), tuple(choice.values()))
            lines += [(f"These are the KD settings the {source} cell chose on training accuracy ({chosen})." if same
                       else f"NOTE: the {source} cell chose {chosen} on training accuracy; this cell runs other "
                            "settings."), ""]
    if not pairs:
        return lines + ["No run has its core-grid finetune of the same seed and ratio yet.", ""]
    lines += kd_ft_table(pd.DataFrame(pairs), "", cell, rows,
                         "KD from this cell's runs; fine-tuning reads none of the KD settings, so FT is the core "
                         "grid's finetune run of the same seed and ratio (same teacher, mask and batch order), "
                         "and KD − FT pairs by seed")
    if unpaired:
        lines += [f"{unpaired} run(s) of this cell have no core-grid finetune with the same teacher and "
                  "compression yet; they are not in the table.", ""]
    return lines


def section(plan: Plan, cell: str, res, core, rows: list, choices: dict[str, dict]) -> list[str]:
    """One check cell: a table of every setting it varies (with the core grid's runs at the same ratio as the
    default setting), per variant, mean ± std, and the paired KD − FT where both ran."""
    varied = plan.grids.get(cell, [])
    ratios = {e.ratio for e, _ in res}
    settings: dict[tuple, list[pd.Series]] = {}
    borrowed = bool(varied) and set(varied) <= F.KD_KEYS
    for e, r in res:
        ft = core_finetune(core, e, r) if borrowed and pd.isna(r.get("acc_finetune")) else None
        if ft is not None:  # fine-tuning reads none of the varied keys: its run of the same seed and ratio
            r = r.copy()
            r["acc_finetune"] = ft
        settings.setdefault(tuple(e.flat.get(k) for k in varied), []).append(r)
    default = tuple({**plan.base, **plan.experiments[0].flat}.get(k) for k in varied)
    seeds = {e.seed for e, _ in res}
    if varied and default not in settings:  # the core grid's runs of the same seeds: every row compares like seeds
        base_runs = [r for e, r in core if e.ratio in ratios and e.seed in seeds]
        if base_runs:
            settings[default] = base_runs
    variants = [v for v in ("kd", "finetune", "scratch", "scratch_kd")
                if any(f"acc_{v}" in r and not pd.isna(r.get(f"acc_{v}")) for rs in settings.values() for r in rs)]
    if cell == "scratch":
        base_runs = [r for e, r in core if e.ratio in ratios and e.seed in seeds]
        variants = ["kd", "finetune", "scratch", "scratch_kd"]
        merged = {}
        for r in base_runs + [r for _, r in res]:
            merged.setdefault(str(r["params.seed"]), {}).update({k: r[k] for k in r.index if str(k).startswith("acc_")
                                                                 and not pd.isna(r[k])})
        lines = [f"## {cell} (ratio {', '.join(f'{x:g}' for x in sorted(ratios))})", "",
                 "Test accuracy %, mean ± std over seeds; kd and finetune from the core grid's runs of the same seeds.",
                 "", "| " + " | ".join(variants) + " | n |", "|" + "---|" * (len(variants) + 1)]
        lines.append("| " + " | ".join(ms([m[f"acc_{v}"] for m in merged.values() if f"acc_{v}" in m])
                                         for v in variants) + f" | {len(merged)} |")
        for v in variants:
            vals = [m[f"acc_{v}"] for m in merged.values() if f"acc_{v}" in m]
            rows.append({"section": cell, "setting": v, "n": len(vals), "mean": float(np.mean(vals)) if vals else None})
        return lines + [""]
    has_train = any("train_acc_kd" in r and not pd.isna(r.get("train_acc_kd")) for rs in settings.values() for r in rs)
    selects = has_train and not set(varied) & BUDGET_KEYS
    head = [*varied, *variants] + ([f"train_acc_kd{' (selection)' if selects else ''}"] if has_train else []) + (
        ["KD − FT (95 % CI)"] if {"kd", "finetune"} <= set(variants) else []) + ["n"]
    lines = [f"## {cell} (ratio {', '.join(f'{x:g}' for x in sorted(ratios))})", "",
             "Test accuracy %, mean ± std over seeds"
             + ("; train_acc_kd: accuracy on a fixed 10k subset of the training split" if has_train else "")
             + (", the only number the choice looks at" if selects else "")
             + (f" ({', '.join(varied)} is a budget: nothing is chosen along it)" if has_train and not selects else "")
             + ". The row with the core grid's setting uses its runs."
             + (f" Fine-tuning reads none of {', '.join(varied)} (alpha = 0 is plain cross-entropy; the teacher is "
                "not run), so every row's finetune is the core grid's finetune run of the same seed and ratio (same "
                "teacher, mask and batch order), and KD − FT pairs by seed." if borrowed else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    diffs = {}
    order = sorted(settings, key=lambda k: tuple(float(x) if isinstance(x, (int, float)) else 0 for x in k))
    for key in order:
        rs = settings[key]
        cells = [str(x) for x in key]
        for v in variants:
            cells.append(ms([r[f"acc_{v}"] for r in rs if not pd.isna(r.get(f"acc_{v}"))]))
        if has_train:
            tr = [float(r["train_acc_kd"]) for r in rs if not pd.isna(r.get("train_acc_kd"))]
            cells.append(ms(tr) if tr else "-")
        if {"kd", "finetune"} <= set(variants):
            both = [r for r in rs if not pd.isna(r.get("acc_kd")) and not pd.isna(r.get("acc_finetune"))]
            p = paired(np.array([float(r["acc_kd"]) for r in both]), np.array([float(r["acc_finetune"]) for r in both]))
            cells.append("-" if math.isnan(p["lo"]) else f"{p['diff']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}]")
            diffs[key] = cells[-1]
            rows.append({"section": cell, "setting": " ".join(f"{k}={x}" for k, x in zip(varied, key)), "n": p["n"],
                         "kd_mean": np.mean([float(r["acc_kd"]) for r in both]) if both else None,
                         "finetune_mean": np.mean([float(r["acc_finetune"]) for r in both]) if both else None,
                         "kd_minus_finetune": p["diff"], "ci95_low": p["lo"], "ci95_high": p["hi"]})
        elif "kd" in variants:
            rows.append({"section": cell, "setting": " ".join(f"{k}={x}" for k, x in zip(varied, key)),
                         "n": len(rs), "kd_mean": np.mean([float(r["acc_kd"]) for r in rs])})
        cells.append(str(len(rs)))
        lines.append("| " + " | ".join(cells) + " |")
    best = best_setting(settings, order, "kd") if selects and len(settings) > 1 else None
    if best is not None:
        choices[cell] = dict(zip(varied, best[0]))
        vs = diffs.get(best[0], "-")
        test = np.mean([float(r["acc_kd"]) for r in settings[best[0]]])
        lines += ["", f"Chosen on training accuracy: {fmt_setting(varied, best[0])} "
                      f"(train_acc_kd {best[1]:.2f} %); its test accuracy: {test:.2f} %"
                      + (f", KD − FT {vs} (95 % CI, not adjusted for the choice)." if vs != "-" else ".")]
        ft = best_setting(settings, order, "finetune") if not set(varied) <= F.KD_KEYS else None
        if ft is not None and {"kd", "finetune"} <= set(variants):
            # both methods read the varied keys: each at its own train-selected setting, paired by seed
            a, b = by_seed(settings[best[0]], "kd"), by_seed(settings[ft[0]], "finetune")
            common = sorted(set(a) & set(b))
            p = paired(np.array([a[x] for x in common]), np.array([b[x] for x in common]))
            ci = "" if math.isnan(p["lo"]) else f" [{p['lo']:+.2f}, {p['hi']:+.2f}] (95 % CI, not adjusted for the choices)"
            lines += ["", f"Each method at its own setting chosen on its own training accuracy: kd at "
                          f"{fmt_setting(varied, best[0])}, finetune at {fmt_setting(varied, ft[0])} (train_acc_finetune "
                          f"{ft[1]:.2f} %; test {np.mean([b[x] for x in common]):.2f} %): KD − FT {p['diff']:+.2f}{ci}, "
                          f"paired by seed (n = {p['n']})."]
            rows.append({"section": cell, "setting": f"each method's own choice: kd {fmt_setting(varied, best[0])}, "
                         f"finetune {fmt_setting(varied, ft[0])}", "n": p["n"], "kd_minus_finetune": p["diff"],
                         "ci95_low": p["lo"], "ci95_high": p["hi"]})
    return lines + [""]


def fmt_setting(keys: list[str], values: tuple) -> str:
    return ", ".join(f"{k}={x}" for k, x in zip(keys, values))


def best_setting(settings: dict[tuple, list[pd.Series]], order: list[tuple], variant: str) -> tuple[tuple, float] | None:
    """The setting with the highest mean train_acc_<variant> (every run of it reporting one; the first in
    ``order`` on a tie), and that mean; None when no setting qualifies."""
    best = None
    for key in order:
        tr = [r.get(f"train_acc_{variant}") for r in settings[key]]
        if tr and not any(pd.isna(x) for x in tr) and (best is None or np.mean(tr) > best[1]):
            best = (key, float(np.mean(tr)))
    return best


def by_seed(runs: list[pd.Series], variant: str) -> dict[str, float]:
    """seed -> acc_<variant> of these runs (one setting's: one run per seed)."""
    return {str(r["params.seed"]): float(r[f"acc_{variant}"]) for r in runs if not pd.isna(r.get(f"acc_{variant}"))}


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
        from kdprune import tracking

        uri = tracking.tracking_uri()
        if args.plan:
            runs = load(plan, uri)
            for e in plan.experiments:
                r = run_for(plan, runs, e)
                print(f"{'done ' + str(r['run_id'])[:8] if r is not None else 'todo    '}  {e.describe()}")
            return 0
        complete = None
        if not args.analyse:
            complete = run_part(plan, args.part_minutes, args.jobs, uri)
        runs = load(plan, uri)
        text, files = analyse(plan, runs)
        print(text)
        if not args.no_mlflow_summary:
            from kdprune import report

            run_id = report.log_summary(uri, plan.experiment, files + [plan.records], len(runs), kind="study")
            print(f"mlflow: study logged as run {run_id} (experiment '{report.reports_experiment(plan.experiment)}')")
        if complete is None:  # --analyse: nothing ran, so say what the records hold
            done = sum(1 for e in plan.experiments if run_for(plan, runs, e) is not None)
            print(f"study {plan.name}: {done} of {len(plan.experiments)} planned experiments done (the frontier "
                  "probes come after them)")
        else:
            print(f"study {plan.name}: {'complete' if complete else 'not complete yet: rerun to resume'}")
        return 0
    except (StudyError, F.FrontierError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
