"""The command-line argument parsers the tools share: lists of numbers, seeds and recovery methods, ``key=value``
overrides, a worker's shard of a grid.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from kdprune import overrides
from kdprune.experiments.runs import FrontierError
from kdprune.params import VARIANTS, ParamsError, params_from_dict, safe_load_yaml
from kdprune.presets import merge

MAX_SEEDS = 100
MAX_SETS = 64


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
        raise FrontierError(f"--seeds {text[:80]!r}: give 1 to {MAX_SEEDS} comma-separated integers in [0, 2^32)")
    seeds = [int(p) for p in parts]
    if any(s >= 2 ** 32 for s in seeds) or len(set(seeds)) != len(seeds):
        raise FrontierError(f"--seeds {text[:80]!r}: seeds must be distinct integers in [0, 2^32)")
    return seeds


def parse_methods(text: str) -> list[str]:
    methods = [x.strip() for x in text.split(",") if x.strip()]
    bad = [m for m in methods if m not in VARIANTS]
    if not methods or bad or len(set(methods)) != len(methods):
        raise FrontierError(f"--methods {text!r}: give distinct recovery variants from {list(VARIANTS)}")
    return methods


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``key=value`` overrides (the value read as YAML, as params.yaml would hold it)."""
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
    try:
        return overrides.nest(flat)
    except overrides.OverrideError as e:
        raise FrontierError(f"--set {e}") from None


MAX_RATIOS = 100
MAX_GRID = 1000  # experiments in one sweep (each a DVC queue entry, a pipeline run and an MLflow run)
MAX_JOBS = 64


def parse_ratios(text: str) -> list[float]:
    """``--ratios``: 1 to MAX_RATIOS distinct finite prune ratios in [0, 1), as params.yaml's prune.ratio."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts or len(parts) > MAX_RATIOS:
        raise FrontierError(f"--ratios {text[:80]!r}: give 1 to {MAX_RATIOS} comma-separated prune ratios in [0, 1)")
    ratios = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise FrontierError(f"--ratios: {p[:40]!r} is not a number; give prune ratios in [0, 1)") from None
        if not (math.isfinite(v) and 0 <= v < 1):
            raise FrontierError(f"--ratios: {v!r} is out of range: allowed [0, 1) (the fraction of prunable weights "
                                "removed; finite)")
        ratios.append(v)
    if len(set(ratios)) != len(ratios):
        raise FrontierError(f"--ratios {text[:80]!r}: the ratios must be distinct")
    return ratios


def parse_jobs(jobs: int) -> int:
    if not 1 <= jobs <= MAX_JOBS:
        raise FrontierError(f"-j {jobs}: allowed 1 to {MAX_JOBS} parallel queue workers")
    return jobs


def check_git_remote(remote: str) -> str:
    """A git remote name or URL for ``dvc exp push``: an argv item, never an option (no leading '-')."""
    if not remote or len(remote) > 1000 or remote.startswith("-") or not remote.isprintable() or " " in remote:
        raise FrontierError(f"--git-remote {remote[:80]!r}: must be a git remote's name or URL (no leading '-', "
                            "no spaces or control characters, at most 1000 characters)")
    return remote


SHARD_MAX = 1000  # more workers than any team's machines; bounds the slice arithmetic


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N <= SHARD_MAX, else a one-line error."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 4 for p in parts):
        raise FrontierError(f"--shard {text[:80]!r} is invalid: use K/N with integers 1 <= K <= N <= {SHARD_MAX} "
                            "(e.g. 2/4 = the second of four workers)")
    k, n = int(parts[0]), int(parts[1])
    if not 1 <= k <= n <= SHARD_MAX:
        raise FrontierError(f"--shard {text!r} is invalid: use K/N with integers 1 <= K <= N <= {SHARD_MAX} "
                            "(e.g. 2/4 = the second of four workers)")
    return k, n


def check_sets(sets: list[str], params_path: Path = Path("params.yaml"),
               ratios: list[float] = ()) -> tuple[str, list[str]]:
    """The MLflow experiment and the ``-S`` arguments for the sweep's ``key=value`` overrides, checked before
    anything is queued (exit 2 with one line): params.yaml + the overrides must validate (with each of
    ``ratios`` as prune.ratio), the values must reach DVC unchanged (no sweep, no interpolation:
    kdprune/overrides.py), and ratio and seed are the sweep's own."""
    try:
        if len(sets) > MAX_SETS:
            raise overrides.OverrideError(f"at most {MAX_SETS} overrides")
        values = dict(overrides.parse(s) for s in sets)
        for key in ("prune.ratio", "seed"):
            if key in values:
                raise overrides.OverrideError(f"{key}: the sweep sets it (--ratios, --seeds)")
        base = safe_load_yaml(params_path.read_text())
        extra = overrides.dvc_args(base, values)
        params = params_from_dict(merge(base, overrides.nest(values)))
    except (overrides.OverrideError, ParamsError) as e:
        print(f"error: -S {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for ratio in ratios:  # e.g. prune.min_layer_density must stay at most 1 - prune.ratio
        try:
            params_from_dict(merge(base, overrides.nest({**values, "prune.ratio": ratio})))
        except (overrides.OverrideError, ParamsError) as e:
            print(f"error: --ratios {ratio!r} with -S: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return params.mlflow.experiment, extra
