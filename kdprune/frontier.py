"""The compression frontier: the most compressed student within an accuracy budget, per recovery method.

  python -m kdprune.frontier --budget 1.0 [--methods kd,finetune,scratch] [--seeds 0,1,2] [--set key=value ...]
                             [-j N] [--lo 2] [--hi 200] [--tolerance 1.25] [--max-probes 8]
  python -m kdprune.frontier --budget 0.5,1,2 --analyse     # no training: the frontier from the runs so far

For each method, the frontier is the largest compression whose mean test accuracy over the seeds stays
within ``--budget`` points of the teacher (the mean of the seeds' teachers).

The search. A *probe* is one ``prune.ratio``, run once per seed: one queued DVC experiment and one MLflow
run per seed, with every method as a variant of that experiment (``distill.variants``), so the methods share
the probe's teacher, mask and batch order. The axis is ``u = -ln(1 - ratio)``: for ``magnitude`` pruning
exactly the log of the compression of the prunable weights, for ``l1_filter``/``channel`` (where ratio is the
channel ratio) a monotone stand-in; both the params compression and the MAC reduction are measured and
reported. The search first probes ``--lo`` and ``--hi`` (compressions); then, as long as some (method,
budget) has its frontier bracketed by a passing probe below and a failing one above that span more than
``--tolerance`` x in compression, it probes the geometric midpoint of that bracket (bisection in
log-compression). All the brackets' midpoints of a round run as one queue (``-j`` workers).

Resume: every finished run is read back from MLflow and from the per-run records CSV (``--records``, all
params, all metrics and the MLflow run id of each run), so a rerun, even on a fresh clone with an empty
``mlflow.db``, reuses every finished probe and trains nothing twice; DVC's run-cache restores each seed's
teacher. A run counts for a probe when every param equals params.yaml + ``--set``, except ``prune.ratio``,
``seed``, ``mlflow.*``, ``evaluate.latency_repeats`` (timing only) and ``distill.variants`` (it must include
every method: variants are trained independently, each from the same seed). A method that does not distil
(finetune, scratch) may come from another run of the same seed and ratio that differs only in the KD settings
(``distill.alpha``, ``temperature``, ``at_beta``), when both runs report the same teacher and compression.

The estimate and its interval. Between the last passing probe and the first failing one, the mean
accuracy is interpolated linearly in log-compression, and the frontier is where it crosses
``teacher - budget``. Each run is judged against its own teacher: a probe whose teacher differs from its seed's
other teachers (a teacher retrained on another CPU type or thread count is not bit-identical) has that difference
taken off its accuracies first (:func:`levelled`); with one teacher per seed, as on one machine, nothing changes.
The bracket ``[low, high]`` is a 95 % percentile bootstrap over seeds: the seeds are
resampled with replacement (the same draw for every probe and the teacher, as the runs are paired by seed),
the estimate is recomputed, 2000 times, seeded. A frontier beyond the probed range is reported as
``>= C`` (or ``< C``): the data says no more than that.

Output: ``metrics/frontier.csv`` and ``metrics/frontier.md`` (every probe: ratio, compression, MAC
reduction, per-method mean ± std and n, the first method minus each other one paired by seed with its 95 % t
interval (unadjusted), run ids; the .md also the headline and the frontier per budget and
method, which ``metrics/frontier_points.csv`` holds as numbers),
``plots/frontier.png``, and a summary run in the MLflow experiment ``<experiment>-reports``.
"""
from __future__ import annotations

import argparse
import ast
import functools
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from kdprune import io
from kdprune.params import VARIANTS, Params, ParamsError, flatten, params_from_dict, safe_load_yaml

IGNORED = ("prune.ratio", "seed", "distill.variants", "evaluate.latency_repeats")
BOOTSTRAP = 2000
MAX_SEEDS = 100
MAX_PROBES = 64
MAX_SETS = 64
MAX_RECORDS_BYTES = 256 * 2**20  # a records CSV: ~5 KB per run, so ~50,000 runs
ACC_COLUMN = re.compile(r"^(train_)?acc_|_(test|train)_acc$")  # accuracies in %
RATIO_COLUMNS = ("compression_ratio", "prunable_compression_ratio", "mac_reduction")
RECORDS = Path("metrics/frontier_runs.csv")
# Keys only a distilling variant reads (kdprune/recovery.py: kd, scratch_kd); the others train on
# cross-entropy alone, so their result does not depend on these (tests check the two lists agree).
KD_KEYS = frozenset({"distill.alpha", "distill.temperature", "distill.at_beta"})
WITHOUT_KD = frozenset({"finetune", "scratch"})
RUN_COLUMNS = ("run_id", "status", "run_name", "dvc_exp_name", "git_commit", "start_time", "end_time")


class FrontierError(ValueError):
    """A bad option, override or records file; the message names it (exit 2)."""


# ----------------------------------------------------------------------------------------------- the axis
def u_of_ratio(ratio: float) -> float:
    return -math.log1p(-ratio)


def ratio_of_u(u: float) -> float:
    """The prune ratio at axis position ``u``, rounded to 4 decimals (a clean, reproducible param value)."""
    return round(-math.expm1(-u), 4)


def ratio_of_compression(c: float) -> float:
    return ratio_of_u(math.log(c))


# ------------------------------------------------------------------------------------------------ records
def same_value(logged: Any, target: Any) -> bool:
    """A param as MLflow or the records CSV hold it (a string) against the value in params.yaml."""
    if isinstance(logged, float) and math.isnan(logged):
        logged = "None"
    text = str(logged)
    if target is None or isinstance(target, bool):
        return text == str(target)
    if isinstance(target, (int, float)):
        try:
            return float(text) == float(target)
        except ValueError:
            return False
    if isinstance(target, (list, tuple, dict)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return False
        return normalise(value) == normalise(target)
    return text == str(target)


def missing(logged: Any) -> bool:
    """A run has no value for a param: the cell is empty (the records CSV) or NaN (a run table whose runs
    were logged with different params, one from before the param existed)."""
    return logged is None or (isinstance(logged, float) and math.isnan(logged)) or logged == ""


@functools.lru_cache(maxsize=1)
def param_defaults() -> dict[str, Any]:
    """Every param's default, flat (read-only: one dict shared by all callers)."""
    return flatten(Params().to_dict())


def param_matches(runs: pd.DataFrame, key: str, value: Any) -> pd.Series:
    """Which runs ran with ``key`` = ``value``. A run with no value for ``key`` was logged before the param
    existed, so it ran with the param's default (kdprune adds a param only with a default that keeps the
    earlier behaviour, e.g. prune.min_layer_density = 0): it matches exactly when ``value`` is that default.
    Without this, adding a param would make every earlier run incomparable, and a resumed study would train
    them all again."""
    defaults = param_defaults()
    as_default = key in defaults and normalise(defaults[key]) == normalise(value)
    col = f"params.{key}"
    if col not in runs:
        return pd.Series(as_default, index=runs.index, dtype=bool)
    return runs[col].map(lambda x: as_default if missing(x) else same_value(x, value)).astype(bool)


def normalise(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [normalise(x) for x in v]
    if isinstance(v, dict):
        return {str(k): normalise(x) for k, x in v.items()}
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def check_metrics(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Refuse metrics no kdprune run can log (they would make a frontier of garbage): an accuracy outside
    [0, 100], a compression below 1, an infinite number. A missing value (NaN) stays: a failed run."""
    for c in df.columns:
        if c in RUN_COLUMNS or c.startswith("params.") or not pd.api.types.is_numeric_dtype(df[c]):
            continue
        v = df[c].to_numpy(dtype=float)
        if ACC_COLUMN.search(c):
            bad = ~np.isnan(v) & ~((v >= 0) & (v <= 100))
            rule = "an accuracy in [0, 100] %"
        elif c in RATIO_COLUMNS:
            bad = ~np.isnan(v) & ~((v >= 1) & np.isfinite(v))
            rule = "a finite compression >= 1"
        else:
            bad = np.isinf(v)
            rule = "a finite number"
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            run = df["run_id"].iloc[i] if "run_id" in df else i
            raise FrontierError(f"{where}: run {str(run)[:40]}: {c} = {v[i]!r} is not {rule} "
                                f"({int(bad.sum())} such value(s)); fix or remove those rows")
    return df


def read_records(path: Path) -> pd.DataFrame:
    """The per-run records CSV (every column a string but the metrics, which are checked), or an empty frame."""
    if not path.exists():
        return pd.DataFrame()
    size = path.stat().st_size
    if size > MAX_RECORDS_BYTES:
        raise FrontierError(f"{path}: {size:,} bytes; a records CSV is at most {MAX_RECORDS_BYTES:,} bytes")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise FrontierError(f"{path}: not a readable records CSV ({str(e)[:200]})") from None
    if "run_id" not in df:
        raise FrontierError(f"{path}: no run_id column; not a kdprune records file")
    for c in df.columns:
        if c not in RUN_COLUMNS and not c.startswith("params."):
            df[c] = pd.to_numeric(df[c].replace("", np.nan), errors="coerce")
    return check_metrics(df, str(path))


def merge_runs(*frames: pd.DataFrame) -> pd.DataFrame:
    """Union of run tables, one row per run id (the first frame wins: pass MLflow first)."""
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.drop_duplicates("run_id", keep="first").reset_index(drop=True)


def write_records(path: Path, runs: pd.DataFrame) -> None:
    from kdprune.report import runs_table

    if runs.empty:
        return
    io.write_text(path, runs_table(runs).to_csv(index=False))


def load_runs(records: Path, uri: str | None, experiment: str) -> pd.DataFrame:
    """Every finished run: MLflow's (when reachable) and the records file's, one row per run id."""
    from_mlflow = pd.DataFrame()
    if uri:
        from kdprune import report

        from_mlflow = check_metrics(report.fetch_runs(uri, experiment), f"MLflow {uri}, experiment {experiment!r}")
    return merge_runs(from_mlflow, read_records(records))


def matching(runs: pd.DataFrame, target: dict[str, Any], methods: list[str], newest: bool = True) -> pd.DataFrame:
    """Runs whose params equal ``target`` (flat) except the IGNORED keys and mlflow.*, whose variants include
    every method and whose metrics hold every method's accuracy; newest per (ratio, seed) (all with
    ``newest=False``)."""
    if runs.empty:
        return runs
    keep = pd.Series(True, index=runs.index)
    for key, value in target.items():
        if key in IGNORED or key.startswith("mlflow."):
            continue
        keep &= param_matches(runs, key, value)
    for m in methods:
        keep &= runs[f"acc_{m}"].notna() if f"acc_{m}" in runs else False
    out = runs[keep].copy()
    if out.empty:
        return out
    out["ratio"] = out["params.prune.ratio"].astype(float).round(6)
    out["seed"] = out["params.seed"].astype(float).astype(int)
    order = out["start_time"].astype(float) if "start_time" in out else pd.Series(0, index=out.index)
    out = out.assign(_t=order).sort_values("_t")
    if newest:
        out = out.drop_duplicates(["ratio", "seed"], keep="last")
    out = out.drop(columns="_t")
    return out.sort_values(["ratio", "seed"]).reset_index(drop=True)


def without_kd_keys(target: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in target.items() if k not in KD_KEYS}


def same_teacher_and_mask(teacher_a, compression_a, teacher_b, compression_b):
    """Two runs of one seed and ratio trained from the same teacher and mask report the same teacher accuracy
    and compression (elementwise for arrays); anything else (other code, other data) must not be paired."""
    return (np.isclose(np.asarray(teacher_a, float), np.asarray(teacher_b, float), rtol=0, atol=1e-9)
            & np.isclose(np.asarray(compression_a, float), np.asarray(compression_b, float), rtol=1e-9, atol=0))


def joined(runs: pd.DataFrame, target: dict[str, Any], methods: list[str]) -> pd.DataFrame:
    """Like ``matching``, but a method that does not distil (finetune, scratch: they read none of KD_KEYS) may
    come from another run of the same seed and ratio whose KD settings differ, e.g. finetune from a study's
    core grid (alpha 0.9) next to kd from a kd-only run at alpha 0.5. One run holding every method is preferred;
    a pair is joined only when both runs report the same teacher accuracy and compression (the same teacher and
    mask, as the stages' cache keys promise), so a mismatch (other code, other data) is never averaged in.
    A joined row's run_id is "<kd run>+<other run>"."""
    whole = matching(runs, target, methods)
    loose = [m for m in methods if m in WITHOUT_KD]
    strict = [m for m in methods if m not in WITHOUT_KD]
    if runs.empty or not loose or not strict or not KD_KEYS & set(target):
        return whole
    a = matching(runs, target, strict)
    b = matching(runs, without_kd_keys(target), loose)
    if a.empty or b.empty or not {"acc_teacher", "compression_ratio"} <= set(a) & set(b):
        return whole  # nothing to join, or no way to tell the two runs share a teacher and mask
    keep = ["ratio", "seed", "run_id", "acc_teacher", "compression_ratio", *(f"acc_{m}" for m in loose)]
    pairs = a.drop(columns=[f"acc_{m}" for m in loose if f"acc_{m}" in a]).merge(
        b[[c for c in keep if c in b]], on=["ratio", "seed"], suffixes=("", "_other"))
    pairs = pairs[same_teacher_and_mask(pairs["acc_teacher"], pairs["compression_ratio"],
                                        pairs["acc_teacher_other"], pairs["compression_ratio_other"])]
    pairs = pairs.assign(run_id=pairs["run_id"].astype(str) + "+" + pairs["run_id_other"].astype(str))
    pairs = pairs.drop(columns=[c for c in pairs if c.endswith("_other")])
    have = set(zip(whole["ratio"], whole["seed"])) if not whole.empty else set()
    extra = pairs[[(r, s) not in have for r, s in zip(pairs["ratio"], pairs["seed"])]]
    out = pd.concat([whole, extra], ignore_index=True) if not whole.empty else extra
    return out.sort_values(["ratio", "seed"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------- probes
@dataclass
class Probe:
    ratio: float
    seeds: list[int]
    acc: dict[str, np.ndarray]  # method -> accuracy per seed (the order of ``seeds``)
    teacher: np.ndarray
    compression: float  # measured: teacher params / non-zero student params (mean over seeds)
    mac_reduction: float
    run_ids: list[str] = field(default_factory=list)

    @property
    def u(self) -> float:
        return u_of_ratio(self.ratio)


def probes_from_runs(runs: pd.DataFrame, methods: list[str], seeds: list[int]) -> list[Probe]:
    """One probe per ratio that has a run for every seed (incomplete ratios are not probes yet)."""
    out = []
    if runs.empty:
        return out
    for ratio, g in runs.groupby("ratio"):
        g = g.set_index("seed")
        if not set(seeds) <= set(g.index):
            continue
        g = g.loc[seeds]
        out.append(Probe(ratio=float(ratio), seeds=list(seeds),
                         acc={m: g[f"acc_{m}"].to_numpy(float) for m in methods},
                         teacher=g["acc_teacher"].to_numpy(float),
                         compression=float(g["compression_ratio"].mean()),
                         mac_reduction=float(g["mac_reduction"].mean()) if "mac_reduction" in g else float("nan"),
                         run_ids=[str(x) for x in g["run_id"]]))
    return sorted(out, key=lambda p: p.ratio)


@dataclass
class Frontier:
    method: str
    budget: float
    threshold: float
    lo: Probe | None  # the last passing probe before the first failing one
    hi: Probe | None  # the first failing probe
    estimate: float  # compression where the mean curve crosses the threshold (nan: censored)
    censored: str  # "" | ">=" (no probe failed) | "<" (the first probe failed already)
    interval: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def width(self) -> float:
        """The bracket's span in log-compression (inf when one side is open)."""
        if self.lo is None or self.hi is None:
            return math.inf
        return self.hi.u - self.lo.u


def _crossing(us: np.ndarray, cs: np.ndarray, means: np.ndarray, threshold: float) -> tuple[int, int, float, str]:
    """(index of the last pass before the first fail, index of that fail, crossing compression, censoring)."""
    passing = means >= threshold  # a NaN mean is a failure
    fails = np.flatnonzero(~passing)
    if fails.size == 0:
        return len(us) - 1, -1, float(cs[-1]), ">="
    first = int(fails[0])
    if first == 0:
        return -1, 0, float(cs[0]), "<"
    a, b = first - 1, first
    span = means[a] - means[b]
    t = (means[a] - threshold) / span if span > 0 else 0.0
    log_c = math.log(cs[a]) + min(max(t, 0.0), 1.0) * (math.log(cs[b]) - math.log(cs[a]))
    return a, b, math.exp(log_c), ""


def levelled(probes: list[Probe], method: str) -> tuple[np.ndarray, np.ndarray]:
    """``method``'s accuracies (probes x seeds) judged against each run's own teacher, and each seed's teacher.

    A seed's teacher is the mean of its probes' teachers; a run whose teacher differs from it by d has d taken off
    its accuracy, so the loss from its own teacher is kept: accuracy - own teacher + the seed's teacher. A
    teacher is the same at every ratio when the run-cache restored it, but one retrained on another CPU type or
    thread count differs (here: 93.28 vs 93.07 % for one seed), and a probe run there would otherwise gain or
    lose that difference against the budget. With one teacher per seed this returns the accuracies unchanged."""
    acc = np.stack([p.acc[method] for p in probes]).astype(float)
    teachers = np.stack([p.teacher for p in probes]).astype(float)
    teacher = teachers.mean(axis=0)
    same = np.isclose(teachers, teacher, rtol=0, atol=1e-9)
    return np.where(same, acc, acc - (teachers - teacher)), teacher


def teacher_spread(probes: list[Probe]) -> float:
    """The largest difference, in points, between a run's teacher and its seed's teacher (0: one per seed)."""
    if not probes:
        return 0.0
    teachers = np.stack([p.teacher for p in probes]).astype(float)
    return float(np.abs(teachers - teachers.mean(axis=0)).max())


def frontier(probes: list[Probe], method: str, budget: float, bootstrap: int = BOOTSTRAP,
             rng_seed: int = 0) -> Frontier:
    """The frontier of one method at one budget from the probes so far (sorted by ratio)."""
    if not probes:
        return Frontier(method, budget, float("nan"), None, None, float("nan"), "")
    us = np.array([p.u for p in probes])
    cs = np.array([p.compression for p in probes])
    acc, teacher = levelled(probes, method)  # probes x seeds; per seed
    threshold = float(teacher.mean()) - budget
    a, b, est, cens = _crossing(us, cs, acc.mean(axis=1), threshold)
    result = Frontier(method, budget, threshold, probes[a] if a >= 0 else None, probes[b] if b >= 0 else None,
                      est, cens)
    n = acc.shape[1]
    if bootstrap and n >= 2:
        rng = np.random.default_rng(rng_seed)
        draws = np.empty(bootstrap)
        for i in range(bootstrap):
            idx = rng.integers(0, n, n)
            draws[i] = _crossing(us, cs, acc[:, idx].mean(axis=1), float(teacher[idx].mean()) - budget)[2]
        result.interval = (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))
    return result


def next_probes(probes: list[Probe], methods: list[str], budgets: list[float], lo: float, hi: float,
                tolerance: float) -> list[float]:
    """The prune ratios to probe next (sorted, unique): the ends of the range first, then the geometric midpoint
    of every bracket wider than ``tolerance`` x; [] when every frontier is pinned down."""
    lo_r, hi_r = ratio_of_compression(lo), ratio_of_compression(hi)
    have = {round(p.ratio, 4) for p in probes}
    ends = [r for r in (lo_r, hi_r) if r not in have]
    if ends:
        return ends
    want = set()
    for m in methods:
        for b in budgets:
            f = frontier(probes, m, b, bootstrap=0)
            if f.lo is not None and f.hi is not None and f.width > math.log(tolerance):
                r = ratio_of_u((f.lo.u + f.hi.u) / 2)
                if r not in have and lo_r < r < hi_r:
                    want.add(r)
    return sorted(want)


def search(run_probe_batch: Callable[[list[float]], list[Probe]], probes: list[Probe], methods: list[str],
           budgets: list[float], lo: float, hi: float, tolerance: float, max_probes: int,
           log: Callable[[str], None] = print) -> list[Probe]:
    """Bisection: probe, recompute the brackets, repeat until they are within tolerance or ``max_probes`` new
    probes ran. ``run_probe_batch(ratios)`` runs them and returns every probe known afterwards."""
    ran = 0
    while True:
        todo = next_probes(probes, methods, budgets, lo, hi, tolerance)
        if not todo:
            log(f"frontier: every bracket is within {tolerance:g}x ({len(probes)} probes)")
            return probes
        if ran + len(todo) > max_probes:
            log(f"frontier: stopping at --max-probes {max_probes}; still open: ratios {todo}")
            return probes
        log(f"frontier: probing ratios {', '.join(f'{r:g}' for r in todo)}")
        before = {p.ratio for p in probes}
        probes = run_probe_batch(todo)
        ran += len(todo)
        missing = [r for r in todo if r not in {p.ratio for p in probes}]
        if missing or {p.ratio for p in probes} == before:
            raise FrontierError(f"probes at ratios {missing or todo} gave no complete result (a failed experiment: "
                                "see `dvc queue logs <name>`); the runs that finished are kept, rerun to resume")


# ------------------------------------------------------------------------------------------------- report
def plural_seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


def fmt_c(c: float) -> str:
    if math.isnan(c):
        return "-"
    return f"{c:.0f}x" if c >= 10 else f"{c:.1f}x"


def describe(f: Frontier) -> str:
    if f.lo is None and f.hi is None:
        return "no probes"
    if f.censored == ">=":
        return f">= {fmt_c(f.estimate)} (no probe fell below the budget)"
    if f.censored == "<":
        return f"< {fmt_c(f.estimate)} (the least compressed probe is already below the budget)"
    lo, hi = f.interval
    ci = f" [{fmt_c(lo)}, {fmt_c(hi)}]" if not math.isnan(lo) else ""
    return f"{fmt_c(f.estimate)}{ci}"


def headline(fronts: list[Frontier], teacher: float, budget: float) -> str:
    parts = [f"{f.method} reaches {describe(f)}" for f in fronts if f.budget == budget]
    return f"within {budget:g} pt of the teacher ({teacher:.2f} %): " + ", ".join(parts)


def paired_gap(p: Probe, a: str, b: str) -> tuple[float, float, float]:
    """``a`` − ``b`` at one probe, paired by seed (same teacher, mask and batch order): the mean difference and its
    95 % t interval, not adjusted for the number of probes (nan bounds below 2 seeds). Levelling by the teacher
    cancels in a difference of the same seed's runs."""
    from kdprune.report import t_interval

    return t_interval(list(np.asarray(p.acc[a], float) - np.asarray(p.acc[b], float)))


def gap_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The paired differences the tables show: the first method against each other one."""
    return [(methods[0], m) for m in methods[1:]]


def probe_table(probes: list[Probe], methods: list[str]) -> pd.DataFrame:
    rows = []
    for p in probes:
        row = {"ratio": p.ratio, "compression": round(p.compression, 3), "mac_reduction": round(p.mac_reduction, 3),
               "n": len(p.seeds), "teacher_mean": round(float(p.teacher.mean()), 3)}
        for m in methods:
            row[f"{m}_mean"] = round(float(p.acc[m].mean()), 3)
            row[f"{m}_std"] = round(float(p.acc[m].std(ddof=1)), 3) if len(p.seeds) > 1 else float("nan")
            row[f"{m}_n"] = len(p.seeds)
        for a, b in gap_pairs(methods):
            gap = paired_gap(p, a, b)
            for k, v in zip(("", "_ci95_low", "_ci95_high"), gap):
                row[f"{a}_minus_{b}{k}"] = round(v, 3)
        row["seeds"] = " ".join(map(str, p.seeds))
        row["run_ids"] = " ".join(p.run_ids)
        rows.append(row)
    return pd.DataFrame(rows)


def frontier_table(fronts: list[Frontier]) -> pd.DataFrame:
    return pd.DataFrame([{"budget": f.budget, "method": f.method, "threshold": round(f.threshold, 3),
                          "frontier": round(f.estimate, 3), "censored": f.censored,
                          "ci95_low": round(f.interval[0], 3), "ci95_high": round(f.interval[1], 3),
                          "last_pass_ratio": f.lo.ratio if f.lo else float("nan"),
                          "first_fail_ratio": f.hi.ratio if f.hi else float("nan")} for f in fronts])


def markdown(probes: list[Probe], fronts: list[Frontier], methods: list[str], budgets: list[float],
             title: str) -> str:
    teacher = float(np.mean([p.teacher.mean() for p in probes])) if probes else float("nan")
    lines = [f"# Compression frontier: {title}", ""]
    lines += [f"- {headline(fronts, teacher, b)}" for b in budgets]
    lines += ["", "The frontier: where the mean test accuracy over the seeds, interpolated linearly in "
              "log-compression between the last probe within the budget and the first one below it, crosses "
              "`teacher - budget`. The bracket: 95 % percentile bootstrap over seeds (seeds resampled with "
              f"replacement, the same draw for every probe and the teacher; {BOOTSTRAP} draws).", "",
              teachers_note(probes), "",
              "| budget (pt) | method | frontier | 95 % bootstrap | last probe within | first probe below |",
              "|---|---|---|---|---|---|"]
    for f in fronts:
        ci = "-" if math.isnan(f.interval[0]) or f.censored else f"[{fmt_c(f.interval[0])}, {fmt_c(f.interval[1])}]"
        lines.append(f"| {f.budget:g} | {f.method} | {('>= ' if f.censored == '>=' else '< ' if f.censored else '')}"
                     f"{fmt_c(f.estimate)} | {ci} | {fmt_c(f.lo.compression) if f.lo else '-'} | "
                     f"{fmt_c(f.hi.compression) if f.hi else '-'} |")
    pairs = gap_pairs(methods)
    lines += ["", "Every probe (test accuracy %, mean ± std over seeds"
              + ("; a − b: the paired difference by seed in points, with its 95 % t interval, not adjusted for the "
                 "number of probes" if pairs else "") + "):", "",
              "| prune ratio | compression (params) | MAC reduction | teacher | "
              + " | ".join(methods + [f"{a} − {b} (95 % CI)" for a, b in pairs]) + " | n |",
              "|---|---|---|---|" + "---|" * (len(methods) + len(pairs)) + "---|"]
    for p in probes:
        cells = [f"{p.acc[m].mean():.2f} ± {p.acc[m].std(ddof=1):.2f}" if len(p.seeds) > 1 else f"{p.acc[m].mean():.2f}"
                 for m in methods]
        for a, b in pairs:
            mean, lo, hi = paired_gap(p, a, b)
            cells.append(f"{mean:+.2f}" + ("" if math.isnan(lo) else f" [{lo:+.2f}, {hi:+.2f}]"))
        lines.append(f"| {p.ratio:g} | {fmt_c(p.compression)} | {p.mac_reduction:.2f}x | {p.teacher.mean():.2f} | "
                     + " | ".join(cells) + f" | {len(p.seeds)} |")
    return "\n".join(lines) + "\n"


def teachers_note(probes: list[Probe]) -> str:
    spread = teacher_spread(probes)
    if spread == 0:
        return "Teachers: each seed had one teacher at every probe (the loss is measured from it)."
    return (f"Teachers: some runs' teachers differ from their seed's other teachers, by up to {spread:.2f} pt "
            "(a teacher retrained on another CPU type or thread count is not bit-identical), so each run is judged "
            "against its own teacher: its accuracy minus its teacher's difference from the seed's mean teacher. "
            "The frontier and the plot use these levelled accuracies; the probe table keeps the raw ones.")


def plot(probes: list[Probe], fronts: list[Frontier], methods: list[str], budgets: list[float], path: Path,
         title: str) -> None:
    """Accuracy against compression (log x): one line per method with a 95 % t band over seeds, the teacher,
    a dotted line per budget, and each method's frontier point at each budget. Left: the whole range; right:
    a zoom on the budgets (teacher - largest budget - 1 pt to teacher + 0.5), where the frontier points lie."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import matplotlib.transforms
    from scipy import stats

    colors = {"kd": "#4c72b0", "finetune": "#55a868", "scratch": "#c44e52", "scratch_kd": "#8172b2"}
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4), dpi=100, layout="constrained", width_ratios=[1.15, 1])
    cs = np.array([p.compression for p in probes])
    teacher = float(np.mean([p.teacher.mean() for p in probes]))
    levels = {m: levelled(probes, m)[0] for m in methods}  # the accuracies the frontier judges (frontier())
    lows = [levels[m].mean(axis=1).min() for m in methods]
    ranges = [(max(0.0, min(min(lows), teacher - max(budgets)) - 2), min(100.0, teacher + 1)),
              (max(0.0, teacher - max(budgets) - 1), min(100.0, teacher + 0.5))]
    for ax, (lo, hi), zoom in zip(axes, ranges, (False, True)):
        for m in methods:
            acc = levels[m]
            mean = acc.mean(axis=1)
            n = acc.shape[1]
            half = (stats.t.ppf(0.975, n - 1) * acc.std(axis=1, ddof=1) / math.sqrt(n) if n > 1
                    else np.zeros_like(mean))
            c = colors.get(m, "#937860")
            ax.plot(cs, mean, marker="o", color=c, label=f"{m} (mean, 95 % band, n = {n})")
            ax.fill_between(cs, np.clip(mean - half, 0, 100), np.clip(mean + half, 0, 100), color=c, alpha=0.18,
                            linewidth=0)  # a t band of accuracies can pass 0 or 100 %; accuracy cannot
        ax.axhline(teacher, color="#555555", linestyle="--", label=f"teacher {teacher:.2f} %")
        right = matplotlib.transforms.blended_transform_factory(ax.transAxes, ax.transData)
        for b in budgets:
            ax.axhline(teacher - b, color="#999999", linestyle=":", linewidth=1)
            if zoom:  # labels at the right edge, where 0.5 pt apart still reads
                ax.text(1.01, teacher - b, f"-{b:g} pt", transform=right, fontsize=7, color="#666666",
                        va="center", ha="left")
        for f in fronts:
            if not f.censored and not math.isnan(f.estimate):
                ax.plot([f.estimate], [f.threshold], marker="D", color=colors.get(f.method, "#937860"),
                        markersize=7, markeredgecolor="k", linestyle="none")
        ax.set_xscale("log")
        ax.set_xticks(cs, [fmt_c(c) for c in cs], fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(lo, hi)
        ax.set_xlabel("compression (teacher params / non-zero student params, log scale)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title("within the budgets (zoom)" if zoom else "all probes", fontsize=9)
    axes[0].set_ylabel("test accuracy (%)" + (", levelled to each seed's teacher" if teacher_spread(probes) else ""))
    axes[0].plot([], [], marker="D", color="w", markeredgecolor="k", linestyle="none", label="frontier (per budget)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def write_outputs(out: Path, probes: list[Probe], methods: list[str], budgets: list[float], title: str,
                  prefix: str = "frontier") -> tuple[list[Path], list[Frontier]]:
    fronts = [frontier(probes, m, b) for b in budgets for m in methods]
    files = [out / "metrics" / f"{prefix}.csv", out / "metrics" / f"{prefix}.md", out / "plots" / f"{prefix}.png",
             out / "metrics" / f"{prefix}_points.csv"]
    io.write_text(files[0], probe_table(probes, methods).to_csv(index=False))
    io.write_text(files[1], markdown(probes, fronts, methods, budgets, title))
    io.write_text(files[3], frontier_table(fronts).to_csv(index=False))
    if probes:
        plot(probes, fronts, methods, budgets, files[2], title)
    return [f for f in files if f.exists()], fronts


# ------------------------------------------------------------------------------------------------- the CLI
def parse_floats(text: str, what: str, lo: float, hi: float, open_lo: bool = True) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FrontierError(f"{what} {text!r}: not a comma-separated list of numbers") from None
    if not vals or len(vals) > 16:
        raise FrontierError(f"{what} {text!r}: give 1 to 16 values")
    for v in vals:
        if not (math.isfinite(v) and (lo < v if open_lo else lo <= v) and v <= hi):
            raise FrontierError(f"{what} {v!r} is out of range: allowed {'(' if open_lo else '['}{lo:g}, {hi:g}]")
    return vals


def parse_seeds(text: str) -> list[int]:
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts or len(parts) > MAX_SEEDS or not all(p.isascii() and p.isdigit() and len(p) <= 10 for p in parts):
        raise FrontierError(f"--seeds {text!r}: give 1 to {MAX_SEEDS} comma-separated integers in [0, 2^32)")
    seeds = [int(p) for p in parts]
    if any(s >= 2 ** 32 for s in seeds) or len(set(seeds)) != len(seeds):
        raise FrontierError(f"--seeds {text!r}: seeds must be distinct integers in [0, 2^32)")
    return seeds


def parse_methods(text: str) -> list[str]:
    methods = [x.strip() for x in text.split(",") if x.strip()]
    bad = [m for m in methods if m not in VARIANTS]
    if not methods or bad or len(set(methods)) != len(methods):
        raise FrontierError(f"--methods {text!r}: give distinct recovery variants from {list(VARIANTS)}")
    return methods


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``key=value`` overrides (the value read as YAML, as params.yaml would hold it)."""
    from kdprune import overrides

    if len(sets) > MAX_SETS:
        raise FrontierError(f"--set: at most {MAX_SETS} overrides")
    out: dict[str, Any] = {}
    for s in sets:
        try:
            key, value = overrides.parse(s)
        except overrides.OverrideError as e:
            raise FrontierError(f"--set {e}") from None
        if key in ("prune.ratio", "seed", "distill.variants"):
            raise FrontierError(f"--set {key}: the search sets it (ratio: the search axis; seed: --seeds; "
                                "variants: --methods)")
        out[key] = value
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    from kdprune import overrides

    try:
        return overrides.nest(flat)
    except overrides.OverrideError as e:
        raise FrontierError(f"--set {e}") from None


def target_params(params_path: Path, sets: dict[str, Any], methods: list[str]):
    """params.yaml + the overrides + the methods as variants, validated like every stage does."""
    from kdprune.presets import merge

    from kdprune import overrides

    base = safe_load_yaml(params_path.read_text())
    try:
        overrides.check_no_interpolation(base, str(params_path))
    except overrides.OverrideError as e:
        raise FrontierError(str(e)) from None
    merged = merge(base, nest({**sets, "distill.variants": methods}))
    try:
        params = params_from_dict(merged)
    except ParamsError as e:
        raise FrontierError(f"--set: {e}") from None
    if params.prune.target_macs_reduction is not None:
        raise FrontierError(f"prune.target_macs_reduction is {params.prune.target_macs_reduction}: channel pruning "
                            "then ignores prune.ratio, the axis the frontier searches; set it to null")
    if params.prune.schedule != "oneshot" and params.prune.method != "magnitude":
        raise FrontierError("prune.schedule agp applies to magnitude pruning only")
    return params, flatten(merged)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.frontier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="1.0", help="accuracy budget(s) in points below the teacher, e.g. 1.0 or 0.5,1,2")
    ap.add_argument("--methods", default="kd,finetune", help="recovery variants to compare (default kd,finetune)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of every probe (default 0,1,2)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="params override for every probe, like dvc exp run -S (repeatable)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers (default 1)")
    ap.add_argument("--lo", type=float, default=2.0, help="least compression searched (default 2x)")
    ap.add_argument("--hi", type=float, default=200.0, help="most compression searched (default 200x)")
    ap.add_argument("--tolerance", type=float, default=1.25,
                    help="stop when each bracket spans at most this factor in compression (default 1.25)")
    ap.add_argument("--max-probes", type=int, default=8, help=f"new probes at most (default 8, at most {MAX_PROBES})")
    ap.add_argument("--records", type=Path, default=RECORDS, help=f"per-run records CSV (default {RECORDS})")
    ap.add_argument("--analyse", action="store_true", help="train nothing: write the frontier from the runs so far")
    ap.add_argument("--no-mlflow-summary", action="store_true", help="don't log the outputs as an MLflow run")
    ap.add_argument("--out", type=Path, default=Path("."), help="directory that gets metrics/ and plots/")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except FrontierError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    budgets = parse_floats(args.budget, "--budget", 0.0, 100.0)
    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    lo = parse_floats(str(args.lo), "--lo", 1.0, 1e6)[0]
    hi = parse_floats(str(args.hi), "--hi", lo, 1e6)[0]
    tolerance = parse_floats(str(args.tolerance), "--tolerance", 1.0, 100.0)[0]
    if not 1 <= args.jobs <= 64:
        raise FrontierError(f"-j {args.jobs}: allowed 1 to 64")
    if not 1 <= args.max_probes <= MAX_PROBES:
        raise FrontierError(f"--max-probes {args.max_probes}: allowed 1 to {MAX_PROBES}")
    sets = parse_sets(args.sets)
    params, target = target_params(Path("params.yaml"), sets, methods)
    from kdprune import tracking

    uri = tracking.tracking_uri()
    experiment = params.mlflow.experiment
    log = lambda m: print(m, flush=True)  # noqa: E731

    def known() -> list[Probe]:
        runs = load_runs(args.records, uri, experiment)
        write_records(args.records, runs)
        return probes_from_runs(joined(runs, target, methods), methods, seeds)

    probes = known()
    log(f"frontier: {len(probes)} finished probes found (MLflow {uri} and {args.records})")
    if not args.analyse:
        from kdprune import overrides, sweep

        try:
            extra = overrides.dvc_args({}, {**sets, "distill.variants": methods})
        except overrides.OverrideError as e:
            raise FrontierError(f"--set {e}") from None

        def run_batch(ratios: list[float]) -> list[Probe]:
            grid = [(s, r) for s in seeds for r in ratios]
            names, status, counts, seconds = sweep.run_grid(grid, extra, args.jobs, "frontier", experiment, log)
            failed = [n for n in names.values() if status.get(n) == "Failed"]
            log(f"frontier: {len(names)} experiments in {seconds:.0f} s; failed: {failed or 'none'}")
            return known()

        t0 = time.time()
        probes = search(run_batch, probes, methods, budgets, lo, hi, tolerance, args.max_probes, log)
        log(f"frontier: search wall time {time.time() - t0:.0f} s")
    if not probes:
        raise FrontierError(f"no finished probes match params.yaml + --set with seeds {seeds} and methods {methods}")
    from kdprune.models import params_name

    title = f"{params.data.name}, {params_name(params.model)}, {params.prune.method} ({plural_seeds(len(seeds))})"
    files, fronts = write_outputs(args.out, probes, methods, budgets, title)
    print(Path(files[1]).read_text())
    if not args.no_mlflow_summary:
        from kdprune import report

        run_id = report.log_summary(uri, experiment, files + ([args.records] if args.records.exists() else []),
                                    sum(len(p.seeds) for p in probes), kind="frontier")
        log(f"mlflow: frontier logged as run {run_id} (experiment '{report.reports_experiment(experiment)}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
