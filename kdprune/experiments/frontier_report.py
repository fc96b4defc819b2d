"""The frontier's outputs: the probe table, the frontier table, the markdown and the plot (metrics/frontier.csv,
.md, _points.csv, plots/frontier.png).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from kdprune import io
from kdprune.experiments.runs import csv_text
from kdprune.experiments.frontier_search import BOOTSTRAP, Frontier, Probe, frontier, levelled, teacher_spread
from kdprune.experiments.stats import t_interval

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
    import matplotlib  # heavy optional dependency: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy optional dependency: only when plotting
    import matplotlib.ticker  # heavy optional dependency: only when plotting
    import matplotlib.transforms  # heavy optional dependency: only when plotting
    from scipy import stats  # heavy optional dependency: only when plotting

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
    io.write_text(files[0], csv_text(probe_table(probes, methods)))
    io.write_text(files[1], markdown(probes, fronts, methods, budgets, title))
    io.write_text(files[3], csv_text(frontier_table(fronts)))
    if probes:
        plot(probes, fronts, methods, budgets, files[2], title)
    return [f for f in files if f.exists()], fronts
