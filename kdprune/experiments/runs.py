"""Run records: the per-run records CSV (every param, every metric and the MLflow run id of each run), merged
with MLflow's runs, and which runs ran with a given set of params.
"""
from __future__ import annotations

import ast
import functools
import io as _stdio
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kdprune import io
from kdprune.params import Params, flatten
from kdprune.tracking.query import RUN_COLUMNS, fetch_runs, runs_table
from kdprune.tracking.store import redact

IGNORED = ("prune.ratio", "seed", "distill.variants", "evaluate.latency_repeats")
MAX_RECORDS_BYTES = 256 * 2**20  # a records CSV: ~5 KB per run, so ~50,000 runs
ACC_COLUMN = re.compile(r"^(train_)?acc_|_(test|train)_acc$")  # accuracies in %
RATIO_COLUMNS = ("compression_ratio", "prunable_compression_ratio", "mac_reduction")
# Keys only a distilling variant reads (kdprune/recovery.py: kd, scratch_kd); the others train on
# cross-entropy alone, so their result does not depend on these (tests check the two lists agree).
KD_KEYS = frozenset({"distill.alpha", "distill.temperature", "distill.at_beta"})
WITHOUT_KD = frozenset({"finetune", "scratch"})
# A method's own metrics beside its accuracy (the frontier's axes read them: kdprune/experiments/frontier_axis.py);
# a method joined from another run takes them from that run, and the CPU-busy record of both runs.
METHOD_METRICS = ("bytes_onnx_{m}", "bytes_onnx_int8_{m}", "bytes_onnx_gzip_{m}", "bytes_onnx_int8_gzip_{m}",
                  "ort_speedup_b1_{m}_int8", "acc_{m}_int8")
BUSY_COLUMNS = ("cpu_busy_fraction_before", "busy")


class FrontierError(ValueError):
    """A bad option, override or records file; the message names it (exit 2)."""


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
    # a regular file (a FIFO would hang, /dev/zero never ends) of at most MAX_RECORDS_BYTES, read with that bound
    text = io.read_regular(path, "a records CSV", MAX_RECORDS_BYTES, FrontierError)
    try:
        df = pd.read_csv(_stdio.BytesIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise FrontierError(f"{path}: not a readable records CSV ({str(e)[:200]})") from None
    df = df.rename(columns=io.csv_unescape).map(io.csv_unescape)  # what csv_text escaped
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
    if runs.empty:
        return
    io.write_text(path, csv_text(runs_table(runs)))


def csv_text(df: pd.DataFrame) -> str:
    """``df`` as CSV text, every text cell and column name escaped with :func:`kdprune.io.csv_safe` (run names,
    ids and params come from MLflow or a records file, and a spreadsheet would run ``=...`` as a formula);
    numeric columns are written as they are. Every CSV of the experiment tools is written through this."""
    out = df.rename(columns=io.csv_safe)
    for i, dtype in enumerate(out.dtypes):
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            out.isetitem(i, out.iloc[:, i].map(io.csv_safe))
    return out.to_csv(index=False)


def load_runs(records: Path, uri: str | None, experiment: str) -> pd.DataFrame:
    """Every finished run: MLflow's (when reachable) and the records file's, one row per run id."""
    from_mlflow = pd.DataFrame()
    if uri:
        from_mlflow = check_metrics(fetch_runs(uri, experiment), f"MLflow {redact(uri)}, experiment {experiment!r}")
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


def busy_number(v: Any) -> float:
    """A busy flag or fraction as MLflow or a records CSV holds it (a number, "True"/"False", empty) as a float."""
    text = str(v).strip().lower()
    if text in ("true", "false"):
        return float(text == "true")
    try:
        return float(text)
    except ValueError:
        return float("nan")


def precision(r: pd.Series) -> str:
    """"bf16" when every training stage the run recorded (<stage>_bf16, cached_<stage>_bf16: 1 under bf16 autocast,
    0 in fp32) ran under bf16 autocast, "fp32" when none did, "mixed" otherwise; for a run logged before the record
    existed, what a forced runtime.bf16 (true, false) says, else "unrecorded"."""
    vals = [float(r[k]) for k in r.index if str(k).endswith("_bf16") and not str(k).startswith("params.")
            and not missing(r[k])]
    if not vals:  # a forced setting says it; auto resolved per machine, unknown without the records
        forced = str(r.get("params.runtime.bf16")).strip().lower()
        return {"true": "bf16", "false": "fp32"}.get(forced, "unrecorded")
    return "bf16" if all(v == 1 for v in vals) else "fp32" if all(v == 0 for v in vals) else "mixed"


def precision_line(runs: list[pd.Series]) -> str:
    """How many of the runs trained teacher and students under bf16 autocast, in fp32, mixed, or did not record it
    (runtime.bf16 auto chooses bf16 where the CPU has native bf16; results are bit-identical only on one CPU type)."""
    counts = {k: 0 for k in ("bf16", "fp32", "mixed", "unrecorded")}
    for r in runs:
        counts[precision(r)] += 1
    modes = sorted({str(r.get("params.runtime.bf16")) for r in runs})
    words = {"bf16": "every training stage under bf16 autocast", "fp32": "every training stage in fp32",
             "mixed": "some stages under bf16 autocast, some in fp32",
             "unrecorded": "not recorded (runtime.bf16 auto, logged before runs recorded it)"}
    return (f"Training precision (runtime.bf16: {', '.join(modes)}), per distinct run: "
            + "; ".join(f"{words[k]}: {n}" for k, n in counts.items() if n) + ".")


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
    own = [f"acc_{m}" for m in loose] + [t.format(m=m) for m in loose for t in METHOD_METRICS]
    keep = ["ratio", "seed", "run_id", "acc_teacher", "compression_ratio", *own, *BUSY_COLUMNS]
    pairs = a.drop(columns=[c for c in own if c in a]).merge(
        b[[c for c in keep if c in b]], on=["ratio", "seed"], suffixes=("", "_other"))
    pairs = pairs[same_teacher_and_mask(pairs["acc_teacher"], pairs["compression_ratio"],
                                        pairs["acc_teacher_other"], pairs["compression_ratio_other"])]
    pairs = pairs.assign(run_id=pairs["run_id"].astype(str) + "+" + pairs["run_id_other"].astype(str))
    for c in BUSY_COLUMNS:  # the pair was timed in two runs: busy when either was
        if f"{c}_other" in pairs:
            other = pd.to_numeric(pairs[f"{c}_other"].map(busy_number), errors="coerce")
            mine = pd.to_numeric(pairs[c].map(busy_number), errors="coerce") if c in pairs else other
            pairs[c] = np.fmax(mine.to_numpy(float), other.to_numpy(float))
    pairs = pairs.drop(columns=[c for c in pairs if c.endswith("_other")])
    have = set(zip(whole["ratio"], whole["seed"])) if not whole.empty else set()
    extra = pairs[[(r, s) not in have for r, s in zip(pairs["ratio"], pairs["seed"])]]
    out = pd.concat([whole, extra], ignore_index=True) if not whole.empty else extra
    return out.sort_values(["ratio", "seed"]).reset_index(drop=True)
