"""The statistics of the reports: t intervals of paired differences, paired t-tests, Holm and Bonferroni
adjustments over several tests.
"""
from __future__ import annotations

import math

import numpy as np

def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t confidence interval of paired differences (nan bounds when n < 2)."""
    from scipy import stats  # heavy optional dependency: only for an interval or test

    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(lo: float, hi: float, n: int) -> str:
    if n < 2 or math.isnan(lo):
        return f"not testable (n = {n}; needs at least 2 seeds)"
    if lo > 0:
        return "KD wins (95 % CI above 0)"
    if hi < 0:
        return "fine-tune wins (95 % CI below 0)"
    return "no significant difference (95 % CI includes 0)"


# ---------------------------------------------------------------------------------------------- analysis
def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of a - b (paired by seed), its 95 % t interval (report.t_interval) and the two-sided paired t-test
    p-value (NaN below 2 pairs)."""
    from scipy import stats  # heavy optional dependency: only for an interval or test

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
    return t_interval(list(np.asarray(diffs, float)), level=1 - 0.05 / m)[1:]
