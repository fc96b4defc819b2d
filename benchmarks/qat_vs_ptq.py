"""QAT-KD against PTQ and against QAT-finetune, paired by seed, from DVC experiments of one repository.

The experiments are plain pipeline runs that differ only in ``quantize.method`` (ptq | qat) and ``seed``, e.g.

  for s in 0 1 2; do for m in ptq qat; do
    dvc exp run -n r98-$m-s$s -S prune.ratio=0.98 -S quantize.method=$m -S seed=$s; done; done
  python benchmarks/qat_vs_ptq.py --repo . --prefix r98- --json benchmarks/results/qat_r98.json

Within a seed, all four INT8 students (kd and finetune, each under ptq and qat) share the teacher, the pruned
mask and the batch order. Reported per seed: the INT8 test accuracy through onnxruntime (``acc_<v>_int8``),
the fp32 accuracy, and under qat the fake-quantized accuracy at the end of training; then the paired
differences (mean and a t-interval over seeds, 95 %): QAT-KD - PTQ-KD, QAT-KD - QAT-FT, QAT-FT - PTQ-FT, and
what PTQ costs (INT8 - fp32 under ptq).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from scipy import stats


def experiments(repo: Path, prefix: str) -> dict[tuple[str, int], dict]:
    """(method, seed) -> flat metrics of the experiments named ``<prefix><method>-s<seed>``."""
    r = subprocess.run(["dvc", "exp", "show", "--json", "-A"], cwd=repo, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"dvc exp show failed: {r.stderr.strip()[-300:]}")
    out: dict = {}
    for top in json.loads(r.stdout):
        for exp in top.get("experiments") or []:
            for rev in exp.get("revs") or []:
                name, data = rev.get("name") or "", rev.get("data") or {}
                if not name.startswith(prefix):
                    continue
                method, _, seed = name[len(prefix):].partition("-s")
                metrics = {k: v for f in (data.get("metrics") or {}).values() for k, v in (f.get("data") or {}).items()}
                if method in ("ptq", "qat") and seed.isdigit():
                    out[(method, int(seed))] = metrics
    return out


def interval(diffs: list[float]) -> dict:
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"mean": mean, "n": n}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "per_seed": diffs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=Path("."))
    ap.add_argument("--prefix", default="r98-", help="experiment names: <prefix>ptq-s<seed>, <prefix>qat-s<seed>")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    exps = experiments(args.repo, args.prefix)
    seeds = sorted(s for m, s in exps if m == "ptq" and ("qat", s) in exps)
    if not seeds:
        print(f"no seed has both {args.prefix}ptq-s<seed> and {args.prefix}qat-s<seed>", file=sys.stderr)
        return 1
    rows = {s: {f"{m}_{k}": exps[(m, s)].get(k) for m in ("ptq", "qat") for k in
                ("acc_kd", "acc_finetune", "acc_kd_int8", "acc_finetune_int8", "acc_kd_fakequant",
                 "acc_finetune_fakequant", "acc_teacher", "compression_ratio")} for s in seeds}
    pairs = {"qat_kd_minus_ptq_kd": ("qat_acc_kd_int8", "ptq_acc_kd_int8"),
             "qat_kd_minus_qat_ft": ("qat_acc_kd_int8", "qat_acc_finetune_int8"),
             "qat_ft_minus_ptq_ft": ("qat_acc_finetune_int8", "ptq_acc_finetune_int8"),
             "ptq_kd_int8_minus_fp32": ("ptq_acc_kd_int8", "ptq_acc_kd"),
             "ptq_ft_int8_minus_fp32": ("ptq_acc_finetune_int8", "ptq_acc_finetune")}
    out = {"seeds": seeds, "per_seed": rows,
           "paired": {k: interval([rows[s][a] - rows[s][b] for s in seeds]) for k, (a, b) in pairs.items()}}
    text = json.dumps(out, indent=2, sort_keys=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
