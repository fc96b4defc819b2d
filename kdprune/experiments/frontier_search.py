"""The frontier's search (see kdprune/experiments/frontier.py): the axis, the probes, the frontier of one method
at one budget with its seed-bootstrap bracket, and the bisection that picks the next probes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from kdprune.experiments.frontier_axis import COMPRESSION, Axis, busy_flags
from kdprune.experiments.runs import FrontierError

BOOTSTRAP = 2000
MAX_PROBES = 64
STRUCTURED = frozenset({"l1_filter", "channel"})  # = kdprune.prune.PHYSICAL (torch-free here): ratio = channel ratio


# ----------------------------------------------------------------------------------------------- the axis
def u_of_ratio(ratio: float) -> float:
    return -math.log1p(-ratio)


def ratio_of_u(u: float) -> float:
    """The prune ratio at axis position ``u``, rounded to 4 decimals (a clean, reproducible param value)."""
    return round(-math.expm1(-u), 4)


def ratio_of_compression(c: float) -> float:
    return ratio_of_u(math.log(c))


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
    axis: dict[str, float] = field(default_factory=dict)  # method -> its axis value (mean over seeds); {}: compression
    busy: np.ndarray | None = None  # per seed: the run flagged the CPU busy while timing (1, 0; NaN: not recorded)
    busy_fraction: np.ndarray | None = None  # per seed: the fraction of the CPUs other work used before timing

    @property
    def u(self) -> float:
        return u_of_ratio(self.ratio)

    def at(self, method: str) -> float:
        """``method``'s value on the frontier's axis (the compression when the probe holds none)."""
        return self.axis.get(method, self.compression)


def probes_from_runs(runs: pd.DataFrame, methods: list[str], seeds: list[int],
                     axis: Axis = COMPRESSION) -> list[Probe]:
    """One probe per ratio that has a run for every seed (incomplete ratios are not probes yet), with each method's
    value on ``axis`` (the mean over seeds; a run without the axis's metric is refused: :meth:`Axis.values`)."""
    out = []
    if runs.empty:
        return out
    for ratio, g in runs.groupby("ratio"):
        g = g.set_index("seed")
        if not set(seeds) <= set(g.index):
            continue
        g = g.loc[seeds]
        out.append(Probe(ratio=float(ratio), seeds=list(seeds),
                         acc={m: axis.accuracies(g.assign(ratio=float(ratio), seed=g.index), m) for m in methods},
                         teacher=g["acc_teacher"].to_numpy(float),
                         compression=float(g["compression_ratio"].mean()),
                         mac_reduction=float(g["mac_reduction"].mean()) if "mac_reduction" in g else float("nan"),
                         run_ids=[str(x) for x in g["run_id"]]))
        p = out[-1]
        if axis is not COMPRESSION:
            g = g.assign(ratio=float(ratio), seed=g.index)
            p.axis = {m: float(axis.values(g, m).mean()) for m in methods}
        if axis.measured:
            p.busy, p.busy_fraction = busy_flags(g)
    return sorted(out, key=lambda p: p.ratio)


def check_compression_grows(probes: list[Probe], prune_method: str, axis: Axis = COMPRESSION) -> None:
    """The search bisects prune.ratio, so the axis must grow strictly with it over the probes, else the brackets
    and the estimate are wrong. ``compression``: checked for l1_filter / channel, where the ratio is a stand-in
    for the compression (Torch-Pruning once left layers whole at high ratios: 1.00x at 0.99; magnitude's ratio is
    its compression). Every other axis: checked for every method, per method where the axis is (bytes, latency).
    A probe at a higher ratio (``probes`` are sorted by ratio) whose value is no larger than a lower one's is
    refused, in one line naming both."""
    if axis is COMPRESSION and prune_method not in STRUCTURED:
        return
    keys = list(probes[0].axis) if probes else []
    for m in keys if axis.per_method else keys[:1] or [""]:  # "": no axis values held, the compression
        for a, b in zip(probes, probes[1:]):
            va, vb = a.at(m), b.at(m)
            if vb > va:
                continue
            runs = ", ".join(b.run_ids[:3]) + (" ..." if len(b.run_ids) > 3 else "")
            tail = (f"(runs of ratio {b.ratio:g}: {runs or 'none'}; remove them, from MLflow and the records, "
                    f"if kdprune refuses that ratio now)")
            if axis is COMPRESSION:
                raise FrontierError(f"prune.method {prune_method}: compression does not grow with prune.ratio: the "
                                    f"probe at ratio {b.ratio:g} compressed {vb:.2f}x, the one at ratio {a.ratio:g} "
                                    f"{va:.2f}x; the search needs compression that grows with the ratio {tail}")
            noisy = (" (a measured timing: noise or a busy CPU can do this; rerun those runs on an idle machine)"
                     if axis.measured else "")
            raise FrontierError(f"prune.method {prune_method}, --axis {axis.name}: the {axis.label}"
                                f"{' of ' + m if axis.per_method else ''} does not grow with prune.ratio: the probe "
                                f"at ratio {b.ratio:g} reached {vb:.2f}x, the one at ratio {a.ratio:g} {va:.2f}x; the "
                                f"search bisects prune.ratio and needs an axis that grows strictly with it{noisy}; use "
                                f"another --axis or a --lo/--hi where it grows (runs of ratio {b.ratio:g}: "
                                f"{runs or 'none'})")


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
        """The bracket's span on the frontier's own axis, in log units: ln(hi / lo) of the method's values at the
        failing and the passing probe (inf when one side is open). Not the span in the bisected ratio: for channel
        pruning the MAC reduction grows about as the square of 1 / (1 - ratio), so a bracket 1.3x wide in the
        ratio is 1.7x wide in MACs."""
        if self.lo is None or self.hi is None:
            return math.inf
        return math.log(self.hi.at(self.method)) - math.log(self.lo.at(self.method))


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
    cs = np.array([p.at(method) for p in probes])  # the method's own values on the axis
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
    """The prune ratios to probe next (sorted, unique): the ends of the range first, then the midpoint in
    ``u`` of every bracket wider than ``tolerance`` x on the frontier's axis (:attr:`Frontier.width`); [] when
    every frontier is pinned down."""
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
           log: Callable[[str], None] = print, prune_method: str = "magnitude",
           axis: Axis = COMPRESSION) -> list[Probe]:
    """Bisection: probe, recompute the brackets, repeat until they are within tolerance or ``max_probes`` new
    probes ran. ``run_probe_batch(ratios)`` runs them and returns every probe known afterwards. Every round first
    checks that the axis grows with the ratio (:func:`check_compression_grows`)."""
    ran = 0
    while True:
        check_compression_grows(probes, prune_method, axis)
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
            limit = (f"; prune.method {prune_method} cannot reach every ratio: the prune stage refuses one that would "
                     "leave a layer no channel and names the largest it allows; rerun with --hi at most "
                     "1 / (1 - that ratio), e.g. --hi 16 for ResNet-8 w16"
                     if prune_method in STRUCTURED and ratio_of_compression(hi) in (missing or todo) else "")
            raise FrontierError(f"probes at ratios {missing or todo} gave no complete result (a failed experiment: "
                                f"see `dvc queue logs <name>`){limit}; the runs that finished are kept, rerun to "
                                "resume")
