"""The frontier's outputs: the probe table, the frontier table, the markdown and the plot (metrics/frontier.csv,
.md, _points.csv, plots/frontier.png; metrics/frontier_<axis>.* and plots/frontier_<axis>.png along another axis).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from kdprune import io
from kdprune.experiments.frontier_axis import BUSY_WARNING, COMPRESSION, Axis
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


def headline(fronts: list[Frontier], teacher: float, budget: float, axis: Axis = COMPRESSION) -> str:
    parts = [f"{f.method} reaches {describe(f)}" for f in fronts if f.budget == budget]
    along = "" if axis is COMPRESSION else f", along the {axis.label}"
    return f"within {budget:g} pt of the teacher ({teacher:.2f} %){along}: " + ", ".join(parts)


def paired_gap(p: Probe, a: str, b: str) -> tuple[float, float, float]:
    """``a`` − ``b`` at one probe, paired by seed (same teacher, mask and batch order): the mean difference and its
    95 % t interval, not adjusted for the number of probes (nan bounds below 2 seeds). Levelling by the teacher
    cancels in a difference of the same seed's runs."""
    return t_interval(list(np.asarray(p.acc[a], float) - np.asarray(p.acc[b], float)))


def gap_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The paired differences the tables show: the first method against each other one."""
    return [(methods[0], m) for m in methods[1:]]


def probe_table(probes: list[Probe], methods: list[str], axis: Axis = COMPRESSION) -> pd.DataFrame:
    rows = []
    for p in probes:
        row = {"ratio": p.ratio, "compression": round(p.compression, 3), "mac_reduction": round(p.mac_reduction, 3),
               "n": len(p.seeds), "teacher_mean": round(float(p.teacher.mean()), 3)}
        for m in methods:
            row[f"{m}_mean"] = round(float(p.acc[m].mean()), 3)
            row[f"{m}_std"] = round(float(p.acc[m].std(ddof=1)), 3) if len(p.seeds) > 1 else float("nan")
            row[f"{m}_n"] = len(p.seeds)
            if axis.per_method:
                row[axis.column(m)] = round(p.at(m), 3)
        for a, b in gap_pairs(methods):
            gap = paired_gap(p, a, b)
            for k, v in zip(("", "_ci95_low", "_ci95_high"), gap):
                row[f"{a}_minus_{b}{k}"] = round(v, 3)
        if axis.measured:
            row["busy_runs"], row["cpu_busy_fraction_max"] = busy_summary(p)
        row["seeds"] = " ".join(map(str, p.seeds))
        row["run_ids"] = " ".join(p.run_ids)
        rows.append(row)
    return pd.DataFrame(rows)


def busy_summary(p: Probe) -> tuple[str, float]:
    """A timed probe's runs flagged as timed on a busy CPU ("k/n"; "?" for runs that did not record it) and the
    largest fraction of the CPUs other work used before one of them timed."""
    flags = np.asarray(p.busy if p.busy is not None else np.full(len(p.seeds), np.nan), float)
    frac = np.asarray(p.busy_fraction if p.busy_fraction is not None else np.full(len(p.seeds), np.nan), float)
    unknown = int(np.isnan(flags).sum())
    text = f"{int(np.nansum(flags))}/{len(flags)}" + (f" ({unknown} not recorded)" if unknown else "")
    return text, round(float(np.nanmax(frac)), 3) if not np.isnan(frac).all() else float("nan")


def frontier_table(fronts: list[Frontier], axis: Axis = COMPRESSION) -> pd.DataFrame:
    rows = [{"budget": f.budget, "method": f.method, "threshold": round(f.threshold, 3),
             "frontier": round(f.estimate, 3), "censored": f.censored,
             "ci95_low": round(f.interval[0], 3), "ci95_high": round(f.interval[1], 3),
             "last_pass_ratio": f.lo.ratio if f.lo else float("nan"),
             "first_fail_ratio": f.hi.ratio if f.hi else float("nan")} for f in fronts]
    if axis is not COMPRESSION:  # the default's columns stay as they were (the committed file)
        for row in rows:
            row.update(axis=axis.name, unit=axis.unit)
    return pd.DataFrame(rows)


def axis_note(probes: list[Probe], methods: list[str], axis: Axis) -> list[str]:
    """What the axis is, for every axis but the default (whose .md stays as it was): its unit, per method or
    not, and for a timing that it is measured and noisy, with the runs that flagged the CPU busy."""
    if axis is COMPRESSION:
        return []
    lines = [f"The axis: {axis.label} ({axis.unit}; --axis {axis.name}). "
             + ("Each method has its own value at a probe (the mean over its seeds), and its frontier is "
                "interpolated along its own values. " if axis.per_method else "One value per probe, shared by "
                                                                               "its methods. ")
             + "The search bisects prune.ratio; the axis grew strictly with it over these probes (checked)."]
    if axis.measured:
        flagged = [(p.ratio, busy_summary(p)) for p in probes]
        busy = [f"ratio {r:g}: {k}" for r, (k, _) in flagged if not k.startswith("0/")]
        lines += ["", "A measured, noisy figure: latency is timed, not computed, so a rerun gives other values, "
                  "and other work on the CPU slows both the teacher and the student by unequal amounts. Runs that "
                  "flagged the CPU as busy while timing (other work above "
                  f"{BUSY_WARNING:.0%} of the CPUs): " + ("; ".join(busy) if busy else "none") + "."]
    return lines + [""]


def markdown(probes: list[Probe], fronts: list[Frontier], methods: list[str], budgets: list[float],
             title: str, axis: Axis = COMPRESSION) -> str:
    teacher = float(np.mean([p.teacher.mean() for p in probes])) if probes else float("nan")
    lines = [f"# {axis.title} frontier: {title}", ""]
    lines += [f"- {headline(fronts, teacher, b, axis)}" for b in budgets]
    along = "log-compression" if axis is COMPRESSION else f"the log of the {axis.label}"
    heading = "frontier" if axis is COMPRESSION else f"frontier ({axis.label}: {axis.unit})"
    lines += ["", "The frontier: where the mean test accuracy over the seeds, interpolated linearly in "
              f"{along} between the last probe within the budget and the first one below it, crosses "
              "`teacher - budget`. The bracket: 95 % percentile bootstrap over seeds (seeds resampled with "
              f"replacement, the same draw for every probe and the teacher; {BOOTSTRAP} draws).", "",
              *axis_note(probes, methods, axis),
              teachers_note(probes), "",
              f"| budget (pt) | method | {heading} | 95 % bootstrap | last probe within | first probe below |",
              "|---|---|---|---|---|---|"]
    for f in fronts:
        ci = "-" if math.isnan(f.interval[0]) or f.censored else f"[{fmt_c(f.interval[0])}, {fmt_c(f.interval[1])}]"
        lines.append(f"| {f.budget:g} | {f.method} | {('>= ' if f.censored == '>=' else '< ' if f.censored else '')}"
                     f"{fmt_c(f.estimate)} | {ci} | {fmt_c(f.lo.at(f.method)) if f.lo else '-'} | "
                     f"{fmt_c(f.hi.at(f.method)) if f.hi else '-'} |")
    pairs = gap_pairs(methods)
    extra = [f"{m}: {axis.label}" for m in methods] if axis.per_method else []
    extra += ["CPU busy (runs)"] if axis.measured else []
    lines += ["", "Every probe (test accuracy %, mean ± std over seeds"
              + ("; a − b: the paired difference by seed in points, with its 95 % t interval, not adjusted for the "
                 "number of probes" if pairs else "") + "):", "",
              "| prune ratio | compression (params) | MAC reduction | teacher | "
              + " | ".join(methods + [f"{a} − {b} (95 % CI)" for a, b in pairs] + extra) + " | n |",
              "|---|---|---|---|" + "---|" * (len(methods) + len(pairs) + len(extra)) + "---|"]
    for p in probes:
        cells = [f"{p.acc[m].mean():.2f} ± {p.acc[m].std(ddof=1):.2f}" if len(p.seeds) > 1 else f"{p.acc[m].mean():.2f}"
                 for m in methods]
        for a, b in pairs:
            mean, lo, hi = paired_gap(p, a, b)
            cells.append(f"{mean:+.2f}" + ("" if math.isnan(lo) else f" [{lo:+.2f}, {hi:+.2f}]"))
        cells += [f"{p.at(m):.2f}x" for m in methods] if axis.per_method else []
        cells += [busy_summary(p)[0]] if axis.measured else []
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


def axis_ticks(values: list[float]) -> list[float]:
    """Tick positions for the x axis: the probes' values, without those that would print on top of a kept one."""
    out: list[float] = []
    for v in sorted(v for v in values if v > 0 and not math.isnan(v)):
        if not out or math.log(v / out[-1]) > 0.2:  # 22 % apart at least
            out.append(v)
    return out


def plot(probes: list[Probe], fronts: list[Frontier], methods: list[str], budgets: list[float], path: Path,
         title: str, axis: Axis = COMPRESSION) -> None:
    """Accuracy along the axis (log x; each method at its own values on a per-method axis): one line per method
    with a 95 % t band over seeds, the teacher,
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
            xs = np.array([p.at(m) for p in probes])
            ax.plot(xs, mean, marker="o", color=c, label=f"{m} (mean, 95 % band, n = {n})")
            ax.fill_between(xs, np.clip(mean - half, 0, 100), np.clip(mean + half, 0, 100), color=c, alpha=0.18,
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
        ticks = cs if axis is COMPRESSION else axis_ticks([p.at(m) for p in probes for m in methods])
        ax.set_xticks(ticks, [fmt_c(c) for c in ticks], fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(lo, hi)
        ax.set_xlabel("compression (teacher params / non-zero student params, log scale)" if axis is COMPRESSION
                      else f"{axis.label}, log scale\n({axis.unit})", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title("within the budgets (zoom)" if zoom else "all probes", fontsize=9)
    axes[0].set_ylabel("test accuracy (%)" + (", levelled to each seed's teacher" if teacher_spread(probes) else ""))
    axes[0].plot([], [], marker="D", color="w", markeredgecolor="k", linestyle="none", label="frontier (per budget)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title if axis is COMPRESSION else f"{title}: frontier along the {axis.label}", fontsize=10)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def write_outputs(out: Path, probes: list[Probe], methods: list[str], budgets: list[float], title: str,
                  prefix: str = "frontier", axis: Axis = COMPRESSION) -> tuple[list[Path], list[Frontier]]:
    fronts = [frontier(probes, m, b) for b in budgets for m in methods]
    files = [out / "metrics" / f"{prefix}.csv", out / "metrics" / f"{prefix}.md", out / "plots" / f"{prefix}.png",
             out / "metrics" / f"{prefix}_points.csv"]
    io.write_text(files[0], csv_text(probe_table(probes, methods, axis)))
    io.write_text(files[1], markdown(probes, fronts, methods, budgets, title, axis))
    io.write_text(files[3], csv_text(frontier_table(fronts, axis)))
    if probes:
        plot(probes, fronts, methods, budgets, files[2], title, axis)
    return [f for f in files if f.exists()], fronts
