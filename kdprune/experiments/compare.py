"""A readable comparison of DVC experiments: one row per experiment, the columns a person compares.

``dvc exp show`` lists every param and every metric of every file (over a hundred columns). This reads
``dvc exp show --json`` and keeps what differs between compression experiments: method, ratio,
schedule, seed, dataset and model, compression (all parameters and prunable weights), MAC reduction,
and the test accuracy of the teacher, of the pruned model before recovery, and of every recovery
variant that any experiment ran, its INT8 file's accuracy through onnxruntime (``acc_<variant>_int8``) and
bytes (``bytes_onnx_int8_<variant>``) where quantize.method made one. With ``prune.target_macs_reduction`` (channel pruning), ``ratio`` is the
channel ratio reached (metrics/prune.json), and ``macs_target`` the target; ``depth`` is the zoo's only.

    python -m kdprune.compare                 # the workspace, its baseline commit and its experiments
    python -m kdprune.compare -A --csv        # every commit's experiments, as CSV
    python -m kdprune.compare --sort acc_kd   # sorted by a column (descending for acc_*, compression)
"""
from __future__ import annotations

import argparse
import csv
import io as _stdio
import json
import math
import subprocess
import sys
from typing import Any, Iterable, Iterator

from kdprune import io
from kdprune.archs import ARCHS, model_name
from kdprune.dvctool import find_dvc
from kdprune.params import flatten

# params shown first, in this order: what usually differs between experiments
PARAM_COLUMNS = {"method": "prune.method", "ratio": "prune.ratio", "schedule": "prune.schedule",
                 "variants": "distill.variants", "epochs": "distill.epochs", "seed": "seed",
                 "data": "data.name", "arch": "model.arch", "depth": "model.depth"}
COLUMNS = ("method", "ratio", "macs_target", "schedule", "variants", "epochs", "seed", "data", "model", "arch",
           "depth")  # the param columns (and what they imply: the model's name, the MAC target), in order
METRIC_COLUMNS = ("compression_ratio", "prunable_compression_ratio", "mac_reduction", "acc_teacher", "acc_pruned")
VARIANT_ORDER = ("kd", "finetune", "scratch", "scratch_kd")
INT8_BYTES = "bytes_onnx_int8_"  # + model: the INT8 ONNX file's bytes (metrics/evaluate.json)


class CompareError(RuntimeError):
    pass


def _records(exp_show: list) -> Iterator[tuple[str, str, dict]]:
    """(name, rev, data) of every row of ``dvc exp show --json``: commits and their experiments."""
    def walk(entry: dict, parent: str | None) -> Iterator[tuple[str, str, dict]]:
        rev = entry.get("rev") or ""
        name = entry.get("name") or (rev[:7] if rev and rev != "workspace" else rev)
        if entry.get("data"):
            yield name, rev, entry["data"]
        for exp in entry.get("experiments") or []:
            for sub in exp.get("revs") or []:
                yield from walk(sub, rev)

    for top in exp_show:
        yield from walk(top, None)


def row_of(name: str, data: dict) -> dict[str, Any]:
    """One experiment's row: the chosen params and every metric of every metrics file, flattened."""
    params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    metrics: dict[str, Any] = {}
    for _path, content in sorted((data.get("metrics") or {}).items()):
        for k, v in ((content or {}).get("data") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics.setdefault(k, v)
    row: dict[str, Any] = {"experiment": name}
    for col, key in PARAM_COLUMNS.items():
        v = params.get(key)
        row[col] = "+".join(map(str, v)) if isinstance(v, list) else v
    target = params.get("prune.target_macs_reduction")
    if target is not None:  # channel pruning to a MAC target: prune.ratio is not used; show what was reached
        row["ratio"], row["macs_target"] = metrics.get("channel_ratio"), target
    arch, depth = params.get("model.arch"), params.get("model.depth")
    if isinstance(arch, str):
        if arch in ARCHS and isinstance(depth, int):
            row["model"] = model_name(arch, depth)
        elif arch not in ARCHS:  # torchvision, custom: model.depth means nothing there
            row["model"], row["depth"] = model_name(arch, None, params.get("model.name"),
                                                    params.get("model.factory")), None
    for key in METRIC_COLUMNS:
        row[key] = metrics.get(key)
    for key, v in metrics.items():  # the fp32 ONNX files' accuracies (acc_*_onnx) equal torch's within 0.1 pt
        if key.startswith("acc_") and not key.endswith("_onnx") and key not in row:
            row[key] = v
        elif key.startswith(INT8_BYTES) and not key.startswith(INT8_BYTES + "gzip_"):
            row[key] = v  # the shipped INT8 file's size (quantize.method ptq | qat)
    return row


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Columns: the params, then the metrics; a variant's accuracy column only when some row has it."""
    variants = {k for r in rows for k in r if k.startswith("acc_")} - set(METRIC_COLUMNS)
    ordered = [f"acc_{v}" for v in VARIANT_ORDER if f"acc_{v}" in variants] + sorted(variants - {
        f"acc_{v}" for v in VARIANT_ORDER})
    sizes = sorted({k for r in rows for k in r if k.startswith(INT8_BYTES)})
    cols = ["experiment", *COLUMNS, *METRIC_COLUMNS, *ordered, *sizes]
    return [c for c in cols if any(r.get(c) is not None for r in rows)]


def fmt(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if col.startswith("acc_"):
            return f"{v:.2f}"
        if col in ("compression_ratio", "prunable_compression_ratio", "mac_reduction"):
            return f"{v:.2f}x"
        return f"{v:g}"
    return str(v)


def render(rows: list[dict[str, Any]], as_csv: bool = False) -> str:
    cols = table(rows)
    if as_csv:
        buf = _stdio.StringIO()
        w = csv.writer(buf, lineterminator="\n")  # names and values come from DVC: escaped (io.csv_safe)
        w.writerow([io.csv_safe(c) for c in cols])
        w.writerows([io.csv_safe(r.get(c)) for c in cols] for r in rows)
        return buf.getvalue()
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def exp_show_json(dvc_args: Iterable[str]) -> list:
    cmd = ["dvc", "exp", "show", "--json", *dvc_args]  # an argument list: nothing goes through a shell
    try:
        r = subprocess.run([find_dvc() or cmd[0], *cmd[1:]], capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise CompareError("dvc not found: activate the venv (. .venv/bin/activate)") from None
    if r.returncode != 0:
        raise CompareError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()[-500:]}")
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise CompareError(f"`{' '.join(cmd)}` did not print JSON ({e})") from None


def rows_from(exp_show: list, sort: str | None = None) -> list[dict[str, Any]]:
    rows = [row_of(name, data) for name, _rev, data in _records(exp_show)]
    if sort:
        if rows and not any(sort in r for r in rows):
            raise CompareError(f"--sort {sort!r}: no such column; columns: {table(rows)}")
        numeric = [r for r in rows if isinstance(r.get(sort), (int, float))]
        rest = [r for r in rows if not isinstance(r.get(sort), (int, float))]
        rows = sorted(numeric, key=lambda r: r[sort], reverse=True) + rest
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-A", "--all-commits", action="store_true", help="every commit's experiments (dvc exp show -A)")
    ap.add_argument("--rev", action="append", default=[], help="a git revision (repeatable; dvc exp show --rev)")
    ap.add_argument("--csv", action="store_true", help="CSV instead of a markdown table")
    ap.add_argument("--sort", help="sort by this column, descending (e.g. acc_kd, compression_ratio)")
    args = ap.parse_args(argv)
    dvc_args = (["-A"] if args.all_commits else []) + [a for r in args.rev for a in ("--rev", r)]
    try:
        rows = rows_from(exp_show_json(dvc_args), args.sort)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("no experiments with results (run `dvc repro` or `dvc exp run` first)", file=sys.stderr)
        return 1
    sys.stdout.write(render(rows, args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
