"""A study's plan (see kdprune/experiments/study.py): the preset's ``study`` section validated into the list of
planned experiments, and which finished runs cover each of them (the frontier's probes included).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kdprune import overrides, presets
from kdprune.experiments.args import nest, parse_floats, parse_methods, parse_seeds
from kdprune.experiments.frontier_search import Probe, probes_from_runs
from kdprune.experiments.runs import FrontierError, joined, load_runs, matching, same_value, write_records
from kdprune.overrides import override
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
                        params_from_dict(nest(flat))
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
        frontier = {"budgets": parse_floats(",".join(map(str, fr.get("budgets", [1.0]))), "budgets", 0, 100),
                    "methods": parse_methods(",".join(map(str, fr.get("methods", ["kd", "finetune"])))),
                    "seeds": parse_seeds(",".join(map(str, fr.get("seeds", [0, 1, 2])))),
                    "tolerance": parse_floats(str(fr.get("tolerance", 1.5)), "tolerance", 1, 100)[0],
                    "cell": fcell}
        for end in ("lo", "hi"):  # compressions; default: the first cell's least and most compressed ratio
            if end in fr:
                frontier[end] = parse_floats(str(fr[end]), end, 1, 1e6)[0]
        if frontier.get("lo", 1) >= frontier.get("hi", 1e6):
            raise FrontierError(f"lo {frontier['lo']:g} must be below hi {frontier['hi']:g}")
    except FrontierError as e:
        raise StudyError(f"{path}: study.frontier: {e}") from None
    return Plan(name, path, Path(records), experiments, frontier, str(base.get("mlflow.experiment")), base, grids)


# ---------------------------------------------------------------------------------------------- progress
def target(plan: Plan, e: Experiment) -> tuple[dict[str, Any], list[str]]:
    flat = {**plan.base, **e.flat, "prune.ratio": e.ratio, "seed": e.seed}
    return flat, [str(v) for v in flat["distill.variants"]]


def run_for(plan: Plan, runs: pd.DataFrame, e: Experiment) -> pd.Series | None:
    """The newest finished run that covers ``e`` (its params, every variant of it), or None."""
    flat, variants = target(plan, e)
    m = matching(runs, flat, variants)
    if m.empty:
        return None
    hit = m[(m["ratio"] == round(e.ratio, 6)) & (m["seed"] == e.seed)]
    return None if hit.empty else hit.iloc[-1]


def duplicates(plan: Plan, runs: pd.DataFrame, e: Experiment) -> int:
    """How many finished runs beyond one have exactly ``e``'s params (its variants included): a result
    logged twice. (A run that *covers* ``e`` with more variants is no duplicate.)"""
    flat, variants = target(plan, e)
    m = matching(runs, flat, variants, newest=False)
    if m.empty:
        return 0
    same = m[(m["ratio"] == round(e.ratio, 6)) & (m["seed"] == e.seed)]
    same = same[same["params.distill.variants"].map(lambda v: same_value(v, variants))]
    return max(0, len(same) - 1)


def load(plan: Plan, uri: str | None) -> pd.DataFrame:
    runs = load_runs(plan.records, uri, plan.experiment)
    write_records(plan.records, runs)
    return runs


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
    m = matching(runs, flat, methods)
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
                 ) -> list[Probe]:
    """Probes of the frontier: runs with the frontier cell's params (any ratio), on the frontier's seeds; a
    method that does not distil may come from a run of the same seed and ratio at other KD settings
    (frontier.joined), e.g. the core grid's finetune next to a kd-only cell's kd."""
    fr = plan.frontier
    return probes_from_runs(probe_runs(plan, runs, cell), fr["methods"], seeds or fr["seeds"])


def probe_runs(plan: Plan, runs: pd.DataFrame, cell: str | None = None) -> pd.DataFrame:
    """One row per (ratio, seed) with every frontier method, at the cell's params (frontier.joined)."""
    return joined(runs, {**plan.base, **cell_experiment(plan, cell).flat}, plan.frontier["methods"])


def preliminary_seeds(plan: Plan, runs: pd.DataFrame, cell: str | None = None) -> list[int]:
    """While a cell is incomplete: the frontier's seeds with a probe at every one of its ratios."""
    ratios = {round(r, 6) for r in frontier_cell_ratios(plan, cell)}
    j = probe_runs(plan, runs, cell)
    return [s for s in plan.frontier["seeds"]
            if not j.empty and ratios <= {round(float(r), 6) for r in j.loc[j["seed"] == s, "ratio"]}]
