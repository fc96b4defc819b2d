"""Sweep report: every comparable pipeline run in MLflow -> table, paired KD - finetune test, plot.

  python -m kdprune.report            # runs comparable with the current params.yaml
  python -m kdprune.report --all      # every pipeline run in the experiment, grouped anyway
  python -m kdprune.report --methods  # the methods table: every (prune method, ratio, schedule, AT)
                                      # setting x every recovery variant -> metrics/methods.{md,csv}

Writes metrics/report.csv (one row per ratio x method), metrics/report_runs.csv (every run used: its
MLflow run id, status, DVC experiment name, every param and every metric, so each number can be traced
without the git-ignored mlflow.db), metrics/report.md and plots/accuracy_vs_compression.png, and logs them
to MLflow as artifacts of a summary run in the experiment "<mlflow.experiment>-reports" (not among the
pipeline runs). ``--methods`` writes metrics/methods_runs.csv the same way.

"Comparable" means: every param equal to the current params.yaml except ``prune.ratio`` and
``seed`` (and the ``mlflow.*`` keys). When several runs share (ratio, seed), the newest is used.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
import yaml

from kdprune import io
from kdprune.experiments.runs import FrontierError, csv_text, merge_runs, param_matches, read_records
from kdprune.experiments.stats import t_interval, verdict
from kdprune.params import flatten, load_params
from kdprune.archs import params_name
from kdprune.tracking.query import fetch_runs, runs_table
from kdprune.tracking.store import redact, tracking_uri
from kdprune.tracking.summary import log_summary, plural, reports_experiment

VARYING = ("prune.ratio", "seed")
METHODS = ("kd", "finetune")  # recovery variants reported; 'pruned' (no recovery) is shown too
# the methods table compares settings that differ in these keys (and the seed)
SETTING = ("prune.method", "prune.ratio", "prune.schedule", "distill.at_beta")
SETTING_FREE = SETTING + ("seed", "distill.variants", "prune.agp_steps", "prune.agp_end")
VARIANT_COLUMNS = ("pruned", "finetune", "kd", "scratch", "scratch_kd")


def select_comparable(df: pd.DataFrame, current: dict[str, object]) -> tuple[pd.DataFrame, int]:
    """Runs whose params equal ``current`` except the swept keys; newest per (ratio, seed)."""
    if df.empty:
        return df, 0
    keep = pd.Series(True, index=df.index)
    for key, value in current.items():
        if key in VARYING or key.startswith("mlflow."):
            continue
        keep &= param_matches(df, key, value)
    comparable = df[keep].copy()
    comparable["ratio"] = comparable["params.prune.ratio"].astype(float)
    comparable["seed"] = comparable["params.seed"].astype(int)
    comparable = comparable.sort_values("start_time").drop_duplicates(["ratio", "seed"], keep="last")
    return comparable.sort_values(["ratio", "seed"]), int((~keep).sum())


def select_settings(df: pd.DataFrame, current: dict[str, object]) -> tuple[pd.DataFrame, int]:
    """Runs equal to ``current`` except in the method settings and seed; newest per (setting, seed)."""
    if df.empty:
        return df, 0
    keep = pd.Series(True, index=df.index)
    for key, value in current.items():
        if key in SETTING_FREE or key.startswith(("mlflow.", "evaluate.")):
            continue
        keep &= param_matches(df, key, value)
    for key in SETTING:
        keep &= df[f"params.{key}"].notna() if f"params.{key}" in df else False
    runs = df[keep].copy()
    runs["seed"] = runs["params.seed"].astype(int)
    runs = runs.sort_values("start_time").drop_duplicates([f"params.{k}" for k in SETTING] + ["seed"], keep="last")
    return runs, int((~keep).sum())


def methods_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: accuracy mean/std/n of every variant, compression, MACs and latency."""
    rows = []
    keys = [f"params.{k}" for k in SETTING]
    for setting, g in runs.groupby(keys, sort=False):
        row = dict(zip(SETTING, setting))
        row.update(n_runs=len(g), acc_teacher=g["acc_teacher"].mean(), compression_ratio=g["compression_ratio"].mean(),
                   mac_reduction=g["mac_reduction"].mean() if "mac_reduction" in g else float("nan"),
                   run_ids=" ".join(g["run_id"]))
        for v in VARIANT_COLUMNS:
            vals = g[f"acc_{v}"].dropna() if f"acc_{v}" in g else pd.Series(dtype=float)
            row[f"{v}_mean"] = vals.mean() if len(vals) else float("nan")
            row[f"{v}_std"] = vals.std(ddof=1) if len(vals) > 1 else float("nan")
            row[f"{v}_n"] = len(vals)
        sp = [c for c in ("speedup_b128_kd", "speedup_b128_finetune", "speedup_b128_scratch") if c in g]
        row["speedup_b128"] = g[sp].mean(axis=1).mean() if sp else float("nan")
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["_ratio"] = table["prune.ratio"].astype(float)
        table = table.sort_values(["prune.method", "_ratio", "prune.schedule", "distill.at_beta"]).drop(columns="_ratio")
    return table


def methods_markdown(table: pd.DataFrame) -> str:
    lines = ["Test accuracy (%), mean ± std over seeds (n in brackets); '-' = variant not run.", "",
             "| method | ratio | schedule | AT beta | compression | MACs / | speed-up b128 | no recovery | finetune | kd "
             "| scratch | scratch_kd |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, v):
        n = int(r[f"{v}_n"])
        return "-" if n == 0 else f"{fmt(r[f'{v}_mean'], r[f'{v}_std'])} ({n})"

    for _, r in table.iterrows():
        lines.append(f"| {r['prune.method']} | {r['prune.ratio']} | {r['prune.schedule']} | {float(r['distill.at_beta']):g} | "
                     f"{r['compression_ratio']:.2f}x | {r['mac_reduction']:.2f} | {r['speedup_b128']:.2f}x | "
                     + " | ".join(cell(r, v) for v in VARIANT_COLUMNS) + " |")
    if not table.empty:
        lines += ["", f"Teacher: {table['acc_teacher'].mean():.2f} %. Compression: teacher params / non-zero student "
                      "params. MACs /: dense MAC reduction. Speed-up: teacher / student CPU latency at batch 128 "
                      "(mean over the recovered variants and runs)."]
    return "\n".join(lines) + "\n"


def methods_main(out: Path, current: dict, uri: str, experiment: str, use_all: bool) -> int:
    df = fetch_runs(uri, experiment)
    runs, excluded = select_settings(df, {} if use_all else current)
    if runs.empty:
        print(f"error: no pipeline runs comparable with params.yaml in {redact(uri)} ({excluded} differ in more than the "
              f"method settings {list(SETTING)} and seed; try --all)", file=sys.stderr)
        return 2
    table = methods_table(runs)
    io.write_text(out / "metrics" / "methods.csv", csv_text(table))
    io.write_text(out / "metrics" / "methods_runs.csv", csv_text(runs_table(runs)))
    md = methods_markdown(table)
    io.write_text(out / "metrics" / "methods.md", md)
    print(md)
    return 0


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, paired = [], []
    for ratio, g in runs.groupby("ratio"):
        cr = g["compression_ratio"].mean()
        for method in ("pruned", *METHODS):
            col = f"acc_{method}"
            if col not in g:
                continue
            vals = g[col].dropna()
            rows.append({"ratio": ratio, "method": method, "compression_ratio": cr,
                         "prunable_compression_ratio": g["prunable_compression_ratio"].mean(),
                         "acc_mean": vals.mean(), "acc_std": vals.std(ddof=1) if len(vals) > 1 else float("nan"),
                         "n": len(vals), "acc_teacher_mean": g["acc_teacher"].mean(),
                         "run_ids": " ".join(g["run_id"])})
        if {"acc_kd", "acc_finetune"} <= set(g):
            both = g.dropna(subset=["acc_kd", "acc_finetune"])
            diffs = list(both["acc_kd"] - both["acc_finetune"])
            if diffs:
                mean, lo, hi = t_interval(diffs)
                paired.append({"ratio": ratio, "compression_ratio": cr, "n": len(diffs), "kd_minus_finetune": mean,
                               "ci95_low": lo, "ci95_high": hi, "verdict": verdict(lo, hi, len(diffs))})
    return pd.DataFrame(rows), pd.DataFrame(paired)


def fmt(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown(table: pd.DataFrame, paired: pd.DataFrame, n_runs: int, excluded: int) -> str:
    lines = [f"Runs used: {n_runs} (excluded as not comparable with params.yaml: {excluded}). "
             "Accuracy: mean ± std over seeds (test set, %).", "",
             "| prune ratio | compression (all params) | prunable compression | no recovery | finetune | kd | seeds |",
             "|---|---|---|---|---|---|---|"]
    for ratio, g in table.groupby("ratio"):
        cell = {r.method: fmt(r.acc_mean, r.acc_std) for r in g.itertuples()}
        first = g.iloc[0]
        lines.append(f"| {ratio} | {first.compression_ratio:.1f}x | {first.prunable_compression_ratio:.1f}x | "
                     f"{cell.get('pruned', '-')} | {cell.get('finetune', '-')} | {cell.get('kd', '-')} | "
                     f"{int(g['n'].max())} |")
    if not table.empty:
        lines += ["", f"Teacher: {table['acc_teacher_mean'].mean():.2f} %."]
    if not paired.empty:
        lines += ["", "Paired difference KD − finetune (same teacher, mask and batch order per seed), "
                      "95 % t interval:", "",
                  "| prune ratio | n | KD − finetune (pt) | 95 % CI | verdict |", "|---|---|---|---|---|"]
        for r in paired.itertuples():
            ci = "-" if math.isnan(r.ci95_low) else f"[{r.ci95_low:+.2f}, {r.ci95_high:+.2f}]"
            lines.append(f"| {r.ratio} | {r.n} | {r.kd_minus_finetune:+.2f} | {ci} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def _ranges(table: pd.DataFrame) -> tuple[tuple[float, float], tuple[float, float] | None]:
    """The y-range that shows the recovered methods and the teacher, and, when some "no recovery" points
    (error bars included) fall below it, a second range for those (the lower panel of a broken axis)."""
    recovered = table[table["method"] != "pruned"]
    ref = recovered if not recovered.empty else table
    top = (max(0.0, float((ref["acc_mean"] - ref["acc_std"].fillna(0)).min()) - 4),
           min(100.0, float(max(table["acc_teacher_mean"].max(), ref["acc_mean"].max())) + 1.5))
    pruned = table[table["method"] == "pruned"]
    lows = pruned["acc_mean"] - pruned["acc_std"].fillna(0)
    below = pruned[lows < top[0]]
    if below.empty:
        return top, None
    lo = float((below["acc_mean"] - below["acc_std"].fillna(0)).min())
    hi = float((below["acc_mean"] + below["acc_std"].fillna(0)).max())
    pad = max(2.0, 0.1 * (hi - lo))
    return top, (max(0.0, lo - pad), min(top[0], hi + pad))


def figure(table: pd.DataFrame, title: str):
    """Accuracy against compression, one line per method. The y-axis zooms on the recovered methods;
    "no recovery" points below that range get a lower panel (a broken y-axis); the legend sits outside."""
    import matplotlib  # heavy optional dependency: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy optional dependency: only when plotting
    import matplotlib.ticker  # heavy optional dependency: only when plotting

    top, bottom = _ranges(table) if not table.empty else ((0.0, 100.0), None)
    fig = plt.figure(figsize=(7.6, 4.6 if bottom else 4.2), dpi=100, layout="constrained")
    if bottom:
        ax, low = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        axes = [ax, low]
    else:
        ax = low = fig.subplots()
        axes = [ax]
    styles = {"kd": ("#4c72b0", "o", "-"), "finetune": ("#55a868", "s", "-"), "pruned": ("#c44e52", "x", ":")}
    for a in axes:
        for method, g in table.groupby("method"):
            color, marker, ls = styles.get(method, ("#8172b2", "d", "-"))
            g = g.sort_values("compression_ratio")
            label = "no recovery" if method == "pruned" else method
            a.errorbar(g["compression_ratio"], g["acc_mean"], yerr=g["acc_std"].fillna(0), label=label, color=color,
                       marker=marker, linestyle=ls, capsize=3)
        if not table.empty:
            a.axhline(table["acc_teacher_mean"].mean(), color="#555555", linestyle="--", label="teacher")
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylim(*top)
    if bottom:
        low.set_ylim(*bottom)
        ax.spines["bottom"].set_visible(False)
        low.spines["top"].set_visible(False)
        ax.tick_params(axis="x", which="both", bottom=False)
        marks = dict(marker=[(-1, -0.5), (1, 0.5)], markersize=10, linestyle="none", color="k", mec="k", mew=1,
                     clip_on=False)
        ax.plot([0, 1], [0, 0], transform=ax.transAxes, **marks)  # the break: "//" on both y-axes
        low.plot([0, 1], [1, 1], transform=low.transAxes, **marks)
    low.set_xscale("log")
    ticks = sorted(table["compression_ratio"].unique())
    low.set_xticks(ticks, [f"{t:.1f}x" for t in ticks])
    low.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    low.set_xlabel("compression ratio (teacher params / non-zero student params, log scale)")
    fig.supylabel("test accuracy (%)", fontsize=10)
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=9)
    return fig


def plot(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt  # heavy optional dependency: only when plotting

    fig = figure(table, title)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="use every pipeline run, not only the comparable ones")
    ap.add_argument("--out", type=Path, default=Path("."), help="directory that gets metrics/ and plots/")
    ap.add_argument("--no-mlflow-summary", action="store_true", help="don't log the report as an MLflow run")
    ap.add_argument("--methods", action="store_true", help="write the methods table (metrics/methods.md) instead")
    ap.add_argument("--records", type=Path, action="append", default=[],
                    help="also read the runs of a per-run records CSV (e.g. metrics/study_runs.csv; repeatable): "
                         "a clone whose mlflow.db lacks them reports them too")
    args = ap.parse_args(argv)
    params = load_params()
    current = flatten(yaml.safe_load(Path("params.yaml").read_text()))
    uri = tracking_uri()
    if args.methods:
        return methods_main(args.out, current, uri, params.mlflow.experiment, args.all)
    df = fetch_runs(uri, params.mlflow.experiment)
    if args.records:
        try:
            df = merge_runs(df, *(read_records(p) for p in args.records))
        except FrontierError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for c in ("start_time", "end_time"):
            if c in df:
                df[c] = pd.to_numeric(df[c], errors="coerce")
    runs, excluded = select_comparable(df, {} if args.all else current)
    if runs.empty:
        print(f"error: no comparable pipeline runs in {redact(uri)} (experiment '{params.mlflow.experiment}'; "
              f"{excluded} runs differ from params.yaml in more than prune.ratio/seed; try --all)", file=sys.stderr)
        return 2
    table, paired = summarise(runs)

    out = args.out
    files = [out / "metrics" / "report.csv", out / "metrics" / "report_runs.csv", out / "metrics" / "report.md",
             out / "plots" / "accuracy_vs_compression.png"]
    gaps = paired[["ratio", "kd_minus_finetune", "ci95_low", "ci95_high", "verdict"]] if not paired.empty else None
    io.write_text(files[0], csv_text(table.merge(gaps, on="ratio", how="left") if gaps is not None else table))
    io.write_text(files[1], csv_text(runs_table(runs)))
    md = markdown(table, paired, len(runs), excluded)
    io.write_text(files[2], md)
    plot(table, files[3], f"{params.data.name}, {params_name(params.model)}: accuracy vs compression "
                          f"({plural(runs['seed'].nunique(), 'seed')})")
    print(md)
    if not args.no_mlflow_summary:
        run_id = log_summary(uri, params.mlflow.experiment, files, len(runs))
        print(f"mlflow: report logged as run {run_id} (experiment '{reports_experiment(params.mlflow.experiment)}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
