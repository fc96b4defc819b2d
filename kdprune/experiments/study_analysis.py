"""A study's analysis (metrics/study.md, metrics/study.csv, and the frontier's files): the core grid's KD − FT
per ratio, every check cell's table, the settings chosen on training accuracy, and the frontier so far.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdprune import io
from kdprune.experiments.frontier_report import headline, plural_seeds, teachers_note, write_outputs
from kdprune.data.registry import REGISTRY
from kdprune.experiments.runs import KD_KEYS, csv_text, precision_line, same_teacher_and_mask, same_value
from kdprune.experiments.stats import holm, paired, simultaneous
from kdprune.experiments.frontier_axis import AXES, COMPRESSION, Axis
from kdprune.experiments.study_plan import (BUDGET_KEYS, Choice, Experiment, Plan, cell_experiment, duplicates,
                                            frontier_cell_ratios, frontier_own, preliminary_seeds, run_for,
                                            study_probes, target)

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
        distinct = list({r["run_id"]: r for _, r in got + own}.values())
        wall = sum((float(r["end_time"]) - float(r["start_time"])) / 1000 for r in distinct
                   if str(r.get("end_time", "")) not in ("", "nan"))
        which = "those runs and the search's" if own else "those runs"
        lines += [f"Pipeline wall time summed over {which} (MLflow start to end, each the real pipeline time): "
                  f"{wall / 3600:.2f} h.", "", precision_line(distinct),
                  ""]
    core_cell = plan.core
    if plan.choices or plan.pending:
        lines += choices_section(plan)
    core = cell_runs(plan, runs, core_cell)
    if core:
        df = pd.DataFrame([{**r.to_dict(), "ratio": e.ratio, "seed": e.seed} for e, r in core])
        lines += kd_ft_table(df, f"## Core grid: kd vs finetune ({core_cell})", "core", rows,
                             "KD − FT is paired by seed (same teacher, mask and batch order)")
    choices: dict[str, dict] = {}
    for cell in [c.name for c in plan.cells if c.name != core_cell]:
        res = cell_runs(plan, runs, cell)
        if not res:
            lines += [f"## {cell}", "", "No finished runs yet." if cell not in plan.pending else
                      f"Not planned yet: it {plan.pending[cell]}.", ""]
        elif quantizes(plan, cell):
            lines += qat_section(plan, cell, res, core, rows)
        elif borrows_finetune(plan, cell):
            lines += paired_cell(plan, cell, res, core, rows, choices)
        else:
            lines += section(plan, cell, res, core, rows, choices)
    files = [out / "metrics" / f"{plan.outputs}.md", out / "metrics" / f"{plan.outputs}.csv"]
    fr = plan.frontier
    waiting = next(((c, plan.pending[c]) for c in (fr["cell"], core_cell) if c in plan.pending), None)
    if waiting:
        lines += ["## Frontier", "", f"Not yet: the {waiting[0]} cell {waiting[1]}.", ""]
    else:
        for name in fr["axes"]:
            flines, ffiles = frontier_section(plan, runs, AXES[name], out)
            lines += flines
            files += ffiles
    text = "\n".join(lines) + "\n"
    io.write_text(files[0], text)
    io.write_text(files[1], csv_text(pd.DataFrame(rows)))
    return text, files


def frontier_prefix(plan: Plan, axis: Axis) -> str:
    """The frontier files' stem: frontier[_<axis>] for the first study (its committed names), else
    <outputs>_frontier_<axis>."""
    return axis.prefix if plan.outputs == "study" else f"{plan.outputs}_frontier_{axis.name}"


def frontier_section(plan: Plan, runs: pd.DataFrame, axis: Axis, out: Path) -> tuple[list[str], list[Path]]:
    """The frontier along ``axis`` from the frontier cell's probes (or, while the cells run, a preliminary one)."""
    fr, core_cell, lines, files = plan.frontier, plan.core, [], []
    cell = fr["cell"]
    probes, seeds, note = study_probes(plan, runs, axis=axis), fr["seeds"], ""
    if len(probes) < 2:  # the study is still running: a preliminary frontier on the seeds complete so far, from
        # the frontier's cell, or from the core grid while that has more complete seeds (kd at other settings)
        own = preliminary_seeds(plan, runs)
        cell, seeds = fr["cell"], own
        if cell != core_cell and len(core_seeds := preliminary_seeds(plan, runs, core_cell)) > len(own):
            cell, seeds = core_cell, core_seeds
        probes = study_probes(plan, runs, seeds, cell, axis) if seeds else []
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
    if len(probes) >= 2:
        kd = fmt_kd(kd_settings_of(plan, cell))
        prefix = frontier_prefix(plan, axis)
        ffiles, fronts = write_outputs(out, probes, fr["methods"], fr["budgets"],
                                       f"{plan.name}: {plural_seeds(len(seeds))}, kd at {kd}"
                                       + (" (preliminary)" if note else ""), prefix=prefix, axis=axis)
        teacher = float(np.mean([p.teacher.mean() for p in probes]))
        lrs = lr_settings(plan, cell)
        lines += ["## Frontier" + ("" if axis is COMPRESSION else f" along {axis.label}"), "",
                  *[f"- {headline(fronts, teacher, b, axis)}" for b in fr["budgets"]], "",
                  f"From {len(probes)} probes (metrics/{prefix}.md has the table, plots/{prefix}.png the plot; the "
                  f"bracket is a 95 % seed-bootstrap interval). The probes run the {cell} cell's params: kd "
                  f"at {kd}{lrs}; a probe's finetune may come from the run of the same seed and ratio at other KD "
                  f"settings (fine-tuning reads none of them), when both report the same teacher and compression."
                  f"{note}", "", teachers_note(probes), ""]
        files += ffiles
    return lines, files


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
              f"Teacher: {ms(teacher)} % over {plural_seeds(len(teacher))} (one teacher per seed). Test "
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
    """The KD settings (KD_KEYS; at_beta only when used) a cell without a grid runs at."""
    flat = {**plan.base, **cell_experiment(plan, cell).flat}
    return {k: flat[k] for k in sorted(KD_KEYS) if k in flat and not (k == "distill.at_beta" and not flat[k])}


def fmt_kd(kd: dict[str, Any]) -> str:
    """alpha 0.5, temperature 2"""
    return ", ".join(f"{k.split('.')[-1]} {v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else f"{k.split('.')[-1]} {v}" for k, v in kd.items())


def borrows_finetune(plan: Plan, cell: str) -> bool:
    """A cell without a grid that runs kd but not finetune, and whose params differ from the core grid's only in
    the KD settings: its KD − FT pairs with the core grid's finetune of the same seed and ratio."""
    if plan.grids.get(cell) or plan.core in plan.pending:
        return False
    e = next(x for x in plan.experiments if x.cell == cell)
    flat, variants = target(plan, e)
    core, _ = target(plan, cell_experiment(plan, plan.core))
    rest = lambda d: {k: v for k, v in d.items() if k not in KD_KEYS | {"distill.variants"}}  # noqa: E731
    return "kd" in variants and "finetune" not in variants and rest(flat) == rest(core)


def core_finetune(core, e: Experiment, r: pd.Series) -> float | None:
    """The core grid's finetune accuracy for ``e``'s seed and ratio, when that run reports the same teacher
    accuracy and compression as ``r`` (the same teacher and mask); else None."""
    c = next((c for x, c in core if (x.seed, x.ratio) == (e.seed, e.ratio)), None)
    if c is None or pd.isna(c.get("acc_finetune")) or not same_teacher_and_mask(
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
            same = all(same_value(str(kd[k]), v) for k, v in choice.items())
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
    borrowed = bool(varied) and set(varied) <= KD_KEYS
    for e, r in res:
        if borrowed:  # fine-tuning reads none of the varied keys: its run of the same seed and ratio at the core
            # grid's finetune settings, also for a run that ran its own finetune (e.g. one shared with the lr cell,
            # whose finetune ran at that cell's rate, not at the one chosen for finetune); none yet: no pair
            ft = core_finetune(core, e, r)
            r = r.copy()
            r["acc_finetune"] = float("nan") if ft is None else ft
        settings.setdefault(tuple(e.flat.get(k) for k in varied), []).append(r)
    core_flat = {} if plan.core in plan.pending else cell_experiment(plan, plan.core).flat
    default = tuple({**plan.base, **core_flat}.get(k) for k in varied)
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
        ft = best_setting(settings, order, "finetune") if not set(varied) <= KD_KEYS else None
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


def lr_settings(plan: Plan, cell: str) -> str:
    """", lr 0.05; finetune at lr 0.2" when the cell runs finetune at its own rate (distill.finetune_lr), else ""."""
    flat = {**plan.base, **cell_experiment(plan, cell).flat}
    if flat.get("distill.finetune_lr") is None:
        return ""
    return f", lr {flat['distill.lr']:g}; finetune at lr {flat['distill.finetune_lr']:g}"


def choices_section(plan: Plan) -> list[str]:
    """The values chosen on training accuracy for the later cells, once each, and the cells still waiting."""
    seen: dict[tuple, tuple[Choice, list[str]]] = {}
    for cell, made in plan.choices.items():
        for c in made.values():
            seen.setdefault((c.key, c.ref), (c, []))[1].append(cell)
    lines = ["## Settings chosen on training accuracy", "",
             "Each value below is the setting of its cell's grid with the highest mean training accuracy of the "
             "method named (train_acc_<method>: a fixed 10k subset of the training split; the test split is never "
             "looked at), the first in the grid's order on a tie; the cells listed run at it.", ""]
    for c, cells in seen.values():
        lines.append(f"- `{c.key}` = {c.value} for {c.ref.by}: chosen in cell {c.ref.cell} over its `{c.ref.key}` "
                     f"(train_acc_{c.ref.by} {c.score:.2f} %, mean of {c.n} runs); used by {', '.join(cells)}")
    lines += [f"- cell {cell}: not planned yet, it {why}" for cell, why in plan.pending.items()]
    return lines + [""]


def quantizes(plan: Plan, cell: str) -> bool:
    """A cell without a grid that trains quantization-aware (quantize.method qat): compared with the core grid's
    post-training quantization of the same seeds and ratios."""
    if plan.grids.get(cell) or plan.core in plan.pending:
        return False
    flat, _ = target(plan, cell_experiment(plan, cell))
    core, _ = target(plan, cell_experiment(plan, plan.core))
    return flat.get("quantize.method") == "qat" and core.get("quantize.method") == "ptq"


QAT_PAIRS = (("QAT-KD", "QAT-FT"), ("QAT-KD", "PTQ-KD"), ("QAT-FT", "PTQ-FT"), ("PTQ-KD", "PTQ-FT"))


def qat_section(plan: Plan, cell: str, res, core, rows: list) -> list[str]:
    """INT8 accuracy (the INT8 files through onnxruntime) of PTQ (the core grid's runs) against QAT (this cell's)
    for kd and finetune, per ratio, paired by seed; Holm over every comparison of the section."""
    by_ratio: dict[float, list[dict[str, float]]] = {}
    unpaired = 0
    for e, r in res:
        c = next((c for x, c in core if (x.seed, x.ratio) == (e.seed, e.ratio)), None)
        if c is None or not same_teacher_and_mask(c["acc_teacher"], c["compression_ratio"], r["acc_teacher"],
                                                  r["compression_ratio"]):
            unpaired += 1
            continue
        vals = {"FP32-FT": c.get("acc_finetune"), "FP32-KD": c.get("acc_kd"), "PTQ-FT": c.get("acc_finetune_int8"),
                "PTQ-KD": c.get("acc_kd_int8"), "QAT-FT": r.get("acc_finetune_int8"), "QAT-KD": r.get("acc_kd_int8"),
                "mac_reduction": r.get("mac_reduction"), "seed": e.seed}
        if any(v is None or pd.isna(v) for v in vals.values()):
            unpaired += 1
            continue
        by_ratio.setdefault(e.ratio, []).append({k: float(v) for k, v in vals.items()})
    ratios = ", ".join(f"{x:g}" for x in sorted({e.ratio for e, _ in res}))
    lines = [f"## {cell}: post-training against quantization-aware INT8 (ratio {ratios})", "",
             "INT8 test accuracy %, of the INT8 ONNX files through onnxruntime (mean ± std over seeds). PTQ: the core "
             "grid's students quantized after recovery (onnxruntime's static quantization); QAT: this cell's, "
             "recovered with fake quantization in the same scheme (QAT-KD distils from the fp32 teacher), then "
             "quantized the same way. Both from the same teacher and pruned model, paired by seed; FP32: the core "
             "grid's students before quantization.", "",
             "| ratio | MACs / | FP32-FT | FP32-KD | PTQ-FT | PTQ-KD | QAT-FT | QAT-KD | n |", "|" + "---|" * 9]
    tests = []
    for ratio, g in sorted(by_ratio.items()):
        col = lambda k: np.array([x[k] for x in g])  # noqa: E731
        lines.append(f"| {ratio:g} | {col('mac_reduction').mean():.1f}x | " + " | ".join(
            ms(col(k)) for k in ("FP32-FT", "FP32-KD", "PTQ-FT", "PTQ-KD", "QAT-FT", "QAT-KD")) + f" | {len(g)} |")
        tests += [(ratio, a, b, col(a), col(b)) for a, b in QAT_PAIRS]
    stats_ = [paired(x, y) for *_, x, y in tests]
    adj = holm([p["p"] for p in stats_])
    m = sum(1 for p in stats_ if p["n"] >= 2)
    lines += ["", f"Paired differences (pt); the 95 % interval Bonferroni-adjusted for the {m} comparisons of this "
                  "table (family-wise 95 %), the p-value (paired t) Holm-adjusted.", "",
              "| ratio | comparison | difference | 95 % CI (adj.) | Holm p | verdict |", "|" + "---|" * 6]
    for (ratio, a, b, x, y), p, ap in zip(tests, stats_, adj):
        lo, hi = simultaneous(x - y, max(m, 1))
        verdict = ("-" if math.isnan(ap) else f"{a} better" if ap < 0.05 and p["diff"] > 0 else
                   f"{b} better" if ap < 0.05 else "no significant difference")
        lines.append(f"| {ratio:g} | {a} − {b} | {p['diff']:+.2f} | "
                     f"{'-' if math.isnan(lo) else f'[{lo:+.2f}, {hi:+.2f}]'} | "
                     f"{'-' if math.isnan(ap) else f'{ap:.3g}'} | {verdict} |")
        rows.append({"section": cell, "ratio": ratio, "setting": f"{a} - {b}", "n": p["n"], "kd_minus_finetune": None,
                     "difference": p["diff"], "ci95_adj_low": lo, "ci95_adj_high": hi, "p": p["p"], "p_holm": ap})
    if unpaired:
        lines += ["", f"{unpaired} run(s) of this cell have no core-grid run of the same seed and ratio with the same "
                      "teacher and compression (or lack an INT8 accuracy) yet; they are not in the table."]
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
