"""A study's plan (see kdprune/experiments/study.py): the preset's ``study`` section validated into the list of
planned experiments, and which finished runs cover each of them (the frontier's probes included).
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from kdprune import overrides, presets
from kdprune.experiments.args import nest, parse_floats, parse_methods, parse_seeds
from kdprune.experiments.frontier_axis import AXES, COMPRESSION, Axis, check_axis_params
from kdprune.experiments.frontier_search import Probe, probes_from_runs
from kdprune.experiments.runs import FrontierError, joined, load_runs, matching, same_value, write_records
from kdprune.overrides import override
from kdprune.params import ParamsError, flatten, params_from_dict, safe_load_yaml

MAX_EXPERIMENTS = 2000
MAX_LIST = 64
MAX_REFS = 8  # chosen values per cell
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


@dataclass(frozen=True)
class Ref:
    """A ``set`` value chosen by an earlier cell: ``{chosen: <cell>, by: <method>, key: <its grid key>}`` is the value
    of ``key`` (default: the key it sets) in the setting of ``<cell>``'s grid with the highest mean
    ``train_acc_<method>`` over the cell's runs (every seed and ratio; the first in the grid's order on a tie)."""
    cell: str
    by: str
    key: str


@dataclass(frozen=True)
class Cell:
    name: str
    ratios: list[float]
    seeds: list[int]
    sets: dict[str, Any]  # flat key -> value (no Ref)
    refs: dict[str, Ref]  # flat key -> the choice that sets it
    grid: dict[str, list]
    where: str  # "<preset>: study.cells[i]", for messages


@dataclass(frozen=True)
class Choice:
    key: str  # the key set
    value: Any
    ref: Ref
    score: float  # the chosen setting's mean train_acc_<by>
    n: int  # runs averaged


@dataclass
class Plan:
    name: str
    path: Path
    records: Path
    experiments: list[Experiment]  # every cell's whose choices are made (see resolve)
    frontier: dict[str, Any]
    experiment: str  # the MLflow experiment
    base: dict[str, Any]  # params.yaml + the preset's params, flat
    grids: dict[str, list[str]]  # cell -> the keys its grid varies
    cells: list[Cell] = field(default_factory=list)
    core: str = ""  # the core grid's cell (KD − FT per ratio; default: the first cell)
    outputs: str = "study"  # metrics/<outputs>.md and .csv
    preset_flat: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, dict[str, Choice]] = field(default_factory=dict)  # cell -> key -> the choice made for it
    pending: dict[str, str] = field(default_factory=dict)  # cell -> why its experiments are not known yet


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


def _is_ref(v: Any) -> bool:
    return isinstance(v, dict) and "chosen" in v


def _ref(key: str, raw: dict, where: str, cells: dict[str, Cell], base: dict[str, Any]) -> Ref:
    """A ``{chosen, by, key}`` value, checked against the earlier cells: the source has ``key`` in its grid (not a
    budget such as distill.epochs) and runs the method ``by`` whose training accuracy decides."""
    if set(raw) - {"chosen", "by", "key"} or not all(isinstance(raw.get(k, ""), str) for k in ("chosen", "by", "key")):
        raise StudyError(f"{where}.set.{key}: a choice is {{chosen: <an earlier cell>, by: <method>, key: <its grid "
                         f"key, default {key}>}}, got {str(raw)[:80]!r}")
    src, by, gkey = raw["chosen"], raw.get("by", ""), raw.get("key", key)
    cell = cells.get(src)
    if cell is None:
        raise StudyError(f"{where}.set.{key}: chosen {src[:40]!r} is not an earlier cell ({sorted(cells)})")
    if gkey not in cell.grid or gkey in BUDGET_KEYS:
        raise StudyError(f"{where}.set.{key}: cell {src!r} has no grid over {gkey[:60]!r} to choose from"
                         + (" (a budget: nothing is chosen along it)" if gkey in BUDGET_KEYS else ""))
    variants = cell.sets.get("distill.variants", base.get("distill.variants"))
    if by not in [str(v) for v in variants or []]:
        raise StudyError(f"{where}.set.{key}: by {by[:40]!r}: cell {src!r} runs {variants}; the choice is made on "
                         "the training accuracy of one of them")
    return Ref(src, by, gkey)


def _experiments(cell: Cell, sets: dict[str, Any], plan_base: dict[str, Any], preset_flat: dict[str, Any],
                 checked: set[str]) -> list[Experiment]:
    """The cell's experiments with ``sets`` (its own and its choices' values), each validated."""
    out = []
    combos = [dict(zip(cell.grid, c)) for c in itertools.product(*cell.grid.values())] or [{}]
    for seed in cell.seeds:
        for ratio in cell.ratios:
            for combo in combos:
                over = {**preset_flat, **sets, **combo}
                flat = {**plan_base, **over, "prune.ratio": ratio, "seed": seed}
                try:
                    params_from_dict(nest(flat))
                except ParamsError as e:
                    raise StudyError(f"{cell.where} (ratio {ratio}, seed {seed}, {combo}): {e}") from None
                if repr(sorted(over.items())) not in checked:  # DVC must read back exactly these values
                    try:
                        overrides.dvc_args({}, over)
                    except overrides.OverrideError as e:
                        raise StudyError(f"{cell.where}: {e}") from None
                    checked.add(repr(sorted(over.items())))
                out.append(Experiment(cell.name, seed, ratio, tuple(sorted(over.items()))))
    return out


def load_plan(name: str, params_path: Path = Path("params.yaml")) -> Plan:
    """The preset's plan, every cell validated; the cells whose values an earlier cell chooses stay pending until
    ``resolve`` finds that cell's runs (each possible choice is validated here already)."""
    try:
        raw = presets.load_preset(name)
    except presets.PresetError as e:
        raise StudyError(str(e)) from None
    path = presets.PRESETS / f"{name}.yaml"
    study = raw.get("study")
    if not isinstance(study, dict):
        raise StudyError(f"{path}: no 'study' section (a plan of cells); see presets/study-fashion.yaml")
    extra = set(study) - {"records", "cells", "frontier", "core", "outputs"}
    if extra:
        raise StudyError(f"{path}: study: unknown keys {sorted(extra)}; allowed: records, cells, frontier, core, outputs")
    records = study.get("records", "metrics/study_runs.csv")
    if not isinstance(records, str) or not re.fullmatch(r"metrics/[A-Za-z0-9_.-]{1,80}\.csv", records):
        raise StudyError(f"{path}: study.records {str(records)[:80]!r}: must be metrics/<name>.csv")
    outputs = study.get("outputs", "study")
    if not isinstance(outputs, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", outputs):
        raise StudyError(f"{path}: study.outputs {str(outputs)[:80]!r}: a name of lower-case letters, digits and _ "
                         "(metrics/<outputs>.md)")
    params_raw = safe_load_yaml(params_path.read_text())
    try:  # DVC would resolve a ${...} (reading environment variables into params.yaml, git and MLflow)
        overrides.check_no_interpolation(params_raw, str(params_path))
        overrides.check_no_interpolation(raw, str(path))
    except overrides.OverrideError as e:
        raise StudyError(str(e)) from None
    base_raw = presets.merge(params_raw, raw["params"])
    base = flatten(base_raw)
    preset_flat = flatten(raw["params"])
    cells_raw = study.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        raise StudyError(f"{path}: study.cells must be a non-empty list")
    cells: dict[str, Cell] = {}
    checked: set[str] = set()  # override sets already verified against DVC's parser
    planned = 0
    for i, cell in enumerate(cells_raw):
        where = f"{path}: study.cells[{i}]"
        if not isinstance(cell, dict) or set(cell) - {"name", "ratios", "seeds", "set", "grid"}:
            raise StudyError(f"{where}: a mapping with name, ratios, seeds, and optional set and grid")
        cname = cell.get("name")
        if not isinstance(cname, str) or not CELL_NAME.match(cname) or cname in cells:
            raise StudyError(f"{where}.name {str(cname)[:40]!r}: a unique name of lower-case letters, digits, _")
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
            if not isinstance(values, list) or not 1 <= len(values) <= 16 or any(_is_ref(v) for v in values):
                raise StudyError(f"{where}.grid.{key}: a list of 1 to 16 values")
        refs = {k: _ref(k, v, where, cells, base) for k, v in sets.items() if _is_ref(v)}
        if len(refs) > MAX_REFS:
            raise StudyError(f"{where}.set: at most {MAX_REFS} chosen values")
        c = Cell(cname, ratios, seeds, {k: v for k, v in sets.items() if k not in refs}, refs, grid, where)
        planned += len(seeds) * len(ratios) * math.prod(len(v) for v in grid.values())
        if planned > MAX_EXPERIMENTS:
            raise StudyError(f"{path}: more than {MAX_EXPERIMENTS} experiments planned")
        # every value a choice can take is validated now, each with the other choices at their first candidate
        # (on the first seed: a seed changes no param's validity)
        candidates = {k: cells[r.cell].grid[r.key] for k, r in refs.items()}
        first = {k: v[0] for k, v in candidates.items()}
        for n, chosen in enumerate([{**first, k: v} for k, vs in candidates.items() for v in vs] or [{}]):
            _experiments(replace(c, seeds=seeds[:1]) if n else c, {**c.sets, **chosen}, base, preset_flat, checked)
        cells[cname] = c
    core = study.get("core", next(iter(cells)))
    if core not in cells or cells[core].grid:
        raise StudyError(f"{path}: study.core {str(core)[:40]!r}: one of the cells {sorted(cells)} without a grid "
                         "(the core grid: KD − FT per ratio)")
    fr = study.get("frontier") or {}
    if not isinstance(fr, dict) or set(fr) - {"budgets", "methods", "seeds", "tolerance", "lo", "hi", "cell", "axes"}:
        raise StudyError(f"{path}: study.frontier: a mapping with budgets, methods, seeds, tolerance, lo, hi, cell, "
                         "axes")
    fcell = fr.get("cell", next(iter(cells)))
    if fcell not in cells or cells[fcell].grid:
        raise StudyError(f"{path}: study.frontier.cell {str(fcell)[:40]!r}: one of the cells {sorted(cells)} without "
                         "a grid (its params are every probe's)")
    axes = fr.get("axes", ["compression"])
    if not isinstance(axes, list) or not 1 <= len(axes) <= len(AXES) or len(set(map(str, axes))) != len(axes) or \
            any(a not in AXES or a == "latency" for a in axes):
        raise StudyError(f"{path}: study.frontier.axes {str(axes)[:80]!r}: distinct names among "
                         f"{[a for a in AXES if a != 'latency']} (a study times nothing, so not latency)")
    try:
        frontier = {"budgets": parse_floats(",".join(map(str, fr.get("budgets", [1.0]))), "budgets", 0, 100),
                    "methods": parse_methods(",".join(map(str, fr.get("methods", ["kd", "finetune"])))),
                    "seeds": parse_seeds(",".join(map(str, fr.get("seeds", [0, 1, 2])))),
                    "tolerance": parse_floats(str(fr.get("tolerance", 1.5)), "tolerance", 1, 100)[0],
                    "cell": fcell, "axes": list(axes)}
        for end in ("lo", "hi"):  # compressions; default: the first cell's least and most compressed ratio
            if end in fr:
                frontier[end] = parse_floats(str(fr[end]), end, 1, 1e6)[0]
        if frontier.get("lo", 1) >= frontier.get("hi", 1e6):
            raise FrontierError(f"lo {frontier['lo']:g} must be below hi {frontier['hi']:g}")
    except FrontierError as e:
        raise StudyError(f"{path}: study.frontier: {e}") from None
    probe_flat = {**base, **cells[fcell].sets}
    for a in axes:
        try:
            check_axis_params(AXES[a], str(probe_flat.get("prune.method")), probe_flat, 1, train=True)
        except FrontierError as e:
            raise StudyError(f"{path}: study.frontier.axes: {e}") from None
    plan = Plan(name, path, Path(records), [], frontier, str(base.get("mlflow.experiment")), base,
                {c.name: list(c.grid) for c in cells.values()}, list(cells.values()), core, outputs, preset_flat)
    return resolve(plan, pd.DataFrame())


def choose(plan: Plan, runs: pd.DataFrame, experiments: list[Experiment], cell: Cell, by: str
           ) -> tuple[dict[str, Any], float, int] | str:
    """The setting of ``cell``'s grid whose runs have the highest mean train_acc_<by> (the first in the grid's
    order on a tie), its score and the runs averaged; or why it cannot be chosen yet."""
    own = [e for e in experiments if e.cell == cell.name]
    scores: dict[tuple, list[float]] = {}
    done = 0
    for e in own:
        r = run_for(plan, runs, e)
        if r is None:
            continue
        done += 1
        v = pd.to_numeric(r.get(f"train_acc_{by}"), errors="coerce")  # NaN, empty or garbage: no choice
        if v is None or not math.isfinite(v):
            return f"a run of cell {cell.name} ({e.describe()}) has no train_acc_{by}"
        scores.setdefault(tuple(e.flat[k] for k in cell.grid), []).append(float(v))
    if not own or done < len(own):
        return f"waits for cell {cell.name} ({done} of {len(own)} experiments done)"
    best = None
    for setting in itertools.product(*cell.grid.values()):  # the grid's order: the first wins a tie
        vals = scores.get(setting)
        if vals and (best is None or sum(vals) / len(vals) > best[1]):
            best = (setting, sum(vals) / len(vals), len(vals))
    return dict(zip(cell.grid, best[0])), best[1], best[2]


def resolve(plan: Plan, runs: pd.DataFrame) -> Plan:
    """The plan with every cell whose choices can be made from ``runs`` planned (in the preset's order); the
    others pending, with the reason."""
    experiments: list[Experiment] = []
    choices: dict[str, dict[str, Choice]] = {}
    pending: dict[str, str] = {}
    made: dict[tuple[str, str], tuple | str] = {}
    checked: set[str] = set()
    for cell in plan.cells:
        values, why = {}, None
        for key, ref in cell.refs.items():
            if ref.cell in pending:
                why = f"waits for cell {ref.cell}, which {pending[ref.cell]}"
                break
            got = made.setdefault((ref.cell, ref.by), choose(plan, runs, experiments,
                                                             next(c for c in plan.cells if c.name == ref.cell), ref.by))
            if isinstance(got, str):
                why = got
                break
            setting, score, n = got
            values[key] = setting[ref.key]
            choices.setdefault(cell.name, {})[key] = Choice(key, setting[ref.key], ref, score, n)
        if why is not None:
            pending[cell.name] = why
            choices.pop(cell.name, None)
            continue
        experiments += _experiments(cell, {**cell.sets, **values}, plan.base, plan.preset_flat, checked)
        if len(experiments) > MAX_EXPERIMENTS:
            raise StudyError(f"{plan.path}: more than {MAX_EXPERIMENTS} experiments planned")
    return replace(plan, experiments=experiments, choices=choices, pending=pending)


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
    if plan.frontier["cell"] in plan.pending:
        return []
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


def study_probes(plan: Plan, runs: pd.DataFrame, seeds: list[int] | None = None, cell: str | None = None,
                 axis: Axis = COMPRESSION) -> list[Probe]:
    """Probes of the frontier: runs with the frontier cell's params (any ratio), on the frontier's seeds; a
    method that does not distil may come from a run of the same seed and ratio at other KD settings
    (frontier.joined), e.g. the core grid's finetune next to a kd-only cell's kd."""
    fr = plan.frontier
    return probes_from_runs(probe_runs(plan, runs, cell), fr["methods"], seeds or fr["seeds"], axis)


def probe_runs(plan: Plan, runs: pd.DataFrame, cell: str | None = None) -> pd.DataFrame:
    """One row per (ratio, seed) with every frontier method, at the cell's params (frontier.joined)."""
    return joined(runs, {**plan.base, **cell_experiment(plan, cell).flat}, plan.frontier["methods"])


def preliminary_seeds(plan: Plan, runs: pd.DataFrame, cell: str | None = None) -> list[int]:
    """While a cell is incomplete: the frontier's seeds with a probe at every one of its ratios."""
    ratios = {round(r, 6) for r in frontier_cell_ratios(plan, cell)}
    j = probe_runs(plan, runs, cell)
    return [s for s in plan.frontier["seeds"]
            if not j.empty and ratios <= {round(float(r), 6) for r in j.loc[j["seed"] == s, "ratio"]}]
