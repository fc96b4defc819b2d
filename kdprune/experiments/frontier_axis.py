"""The frontier's axis (``--axis``): what "the most compressed student" is measured in, read from each run's metrics.

- ``compression`` (the default): ``compression_ratio``, teacher params / non-zero student params; one value per run
  (every method of a probe shares its mask).
- ``macs``: ``mac_reduction``, teacher MACs / student MACs; one value per run. Only structured pruning
  (``l1_filter``, ``channel``) removes MACs; magnitude pruning keeps every multiply (1.0 at every ratio) and is
  refused.
- ``bytes``: ``bytes_onnx_gzip_teacher / bytes_onnx_int8_gzip_<m>`` per method ``m``: the fp32 teacher's gzipped
  ONNX file over the student's gzipped INT8 ONNX file (gzip turns unstructured zeros into bytes saved). Only runs
  with ``quantize.method`` ptq or qat export INT8.
- ``latency``: ``ort_speedup_b1_<m>_int8`` per method, the ONNX Runtime INT8 speed-up at batch 1 against the fp32
  teacher through ONNX Runtime (``ort_latency_b1_ms_teacher / ort_latency_b1_ms_<m>_int8``, logged from
  logs/latency.json). A timing: not deterministic, and a busy CPU distorts it, so each probe keeps whether its runs
  flagged the CPU as busy (``busy``, else ``cpu_busy_fraction_before`` > :data:`BUSY_WARNING`).

The per-method axes (bytes, latency) can differ between the methods of one probe: each method keeps its own value
(the mean over seeds) and its frontier is interpolated along its own values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from kdprune.experiments.runs import FrontierError, busy_number

BUSY_WARNING = 0.25  # = kdprune.measure.BUSY_WARNING (torch-free here; a test checks they agree)
INT8 = ("ptq", "qat")  # the quantize.method values that export INT8


@dataclass(frozen=True)
class Axis:
    name: str  # the --axis value
    title: str  # "<title> frontier" heads the .md
    label: str  # what the axis measures, in a sentence or a table heading
    unit: str  # how it is computed
    per_method: bool  # a value per method (else one per run, shared by its methods)
    measured: bool = False  # a timing: noisy, not reproducible
    hint: str = ""  # how to get runs that have the metric

    @property
    def prefix(self) -> str:
        """The outputs' file name stem: frontier (compression, the names the committed files have), frontier_<axis>."""
        return "frontier" if self.name == "compression" else f"frontier_{self.name}"

    def metric(self, method: str) -> str:
        """The (numerator's) metric of ``method``'s value in a run (for the CSV columns and the messages)."""
        return {"compression": "compression_ratio", "macs": "mac_reduction",
                "bytes": f"bytes_onnx_int8_gzip_{method}", "latency": f"ort_speedup_b1_{method}_int8"}[self.name]

    def metrics(self, method: str) -> tuple[str, ...]:
        """Every metric ``method``'s value is computed from."""
        if self.name == "bytes":
            return ("bytes_onnx_gzip_teacher", self.metric(method))
        return (self.metric(method),)

    def accuracy(self, method: str) -> str:
        """The accuracy a probe of ``method`` is judged by: on the bytes and latency axes the student shipped is its
        INT8 file, so its accuracy through onnxruntime (``acc_<m>_int8``); else torch's ``acc_<m>``."""
        return f"acc_{method}_int8" if self.name in ("bytes", "latency") else f"acc_{method}"

    def accuracies(self, runs: pd.DataFrame, method: str) -> np.ndarray:
        """``method``'s accuracy (:meth:`accuracy`) in each run; an INT8 accuracy missing from a run is refused."""
        name = self.accuracy(method)
        col = runs[name].to_numpy(float) if name in runs else np.full(len(runs), np.nan)
        bad = np.flatnonzero(np.isnan(col))
        if bad.size and name != f"acc_{method}":  # acc_<m>: as before (a NaN probe fails the budget)
            raise FrontierError(f"--axis {self.name}: {self._run(runs, bad[0])} has no {name} ({bad.size} of the "
                                f"{len(runs)} run(s) of the probes lack it): {self.hint}")
        return col

    def column(self, method: str) -> str:
        """The probe table's column of ``method``'s value (per-method axes only)."""
        return f"{method}_{'int8_gzip_size_reduction' if self.name == 'bytes' else 'ort_int8_speedup_b1'}"

    def values(self, runs: pd.DataFrame, method: str) -> np.ndarray:
        """``method``'s axis value in each run of ``runs``; a run without the metric (or with an impossible value)
        is refused, naming the metric, the run and how to get runs that have it."""
        for name in self.metrics(method):
            col = runs[name].to_numpy(float) if name in runs else np.full(len(runs), np.nan)
            bad = np.flatnonzero(np.isnan(col))
            if bad.size and self.name != "compression":  # compression: as before (a NaN probe fails the budget)
                raise FrontierError(f"--axis {self.name}: {self._run(runs, bad[0])} has no {name} "
                                    f"({bad.size} of the {len(runs)} run(s) of the probes lack it): {self.hint}")
            bad = np.flatnonzero(~np.isnan(col) & ~(np.isfinite(col) & (col > 0)))
            if bad.size:
                raise FrontierError(f"--axis {self.name}: {self._run(runs, bad[0])}: {name} = {col[bad[0]]!r} is "
                                    "not a positive finite number; fix or remove that run")
        if self.name == "bytes":
            return runs["bytes_onnx_gzip_teacher"].to_numpy(float) / runs[self.metric(method)].to_numpy(float)
        return runs[self.metric(method)].to_numpy(float)

    @staticmethod
    def _run(runs: pd.DataFrame, i: int) -> str:
        row = runs.iloc[i]
        run_id = str(row.get("run_id", i))[:40]
        where = f" (prune.ratio {float(row['ratio']):g}, seed {int(row['seed'])})" if {"ratio", "seed"} <= set(
            row.index) else ""
        return f"run {run_id}{where}"


_QUANTIZE = "rerun them with quantize.method ptq or qat (--set quantize.method=ptq)"
AXES = {a.name: a for a in (
    Axis("compression", "Compression", "compression", "teacher params / non-zero student params", False),
    Axis("macs", "MAC-reduction", "MAC reduction", "teacher MACs / student MACs", False,
         hint="runs from before MACs were measured; rerun them"),
    Axis("bytes", "INT8 size", "INT8 gzip size reduction",
         "fp32 teacher ONNX gzip bytes / student INT8 ONNX gzip bytes; the students' accuracy: their INT8 files "
         "through onnxruntime", True,
         hint=f"only runs that export INT8 measure its size; {_QUANTIZE}"),
    Axis("latency", "INT8 latency", "ORT INT8 speed-up at batch 1",
         "fp32 teacher ORT ms / student INT8 ORT ms at batch 1, measured: noisy; the students' accuracy: their INT8 "
         "files through onnxruntime", True, measured=True,
         hint=f"only runs that export INT8 and time it measure it; {_QUANTIZE} and evaluate.latency_repeats > 0"),
)}
COMPRESSION = AXES["compression"]


def busy_flags(runs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per run: whether it flagged the CPU as busy while timing (1.0, 0.0, NaN: not recorded) and the fraction of
    the CPUs other work used before it timed (NaN: not recorded). ``busy`` where logged, else the fraction against
    :data:`BUSY_WARNING`, as the evaluate stage decides it."""
    frac = (runs["cpu_busy_fraction_before"].map(busy_number).to_numpy(float) if "cpu_busy_fraction_before" in runs
            else np.full(len(runs), np.nan))
    flag = np.where(np.isnan(frac), np.nan, (frac > BUSY_WARNING).astype(float))
    if "busy" in runs:
        logged = runs["busy"].map(busy_number).to_numpy(float)
        flag = np.where(np.isnan(logged), flag, (logged > 0).astype(float))
    return flag, frac


def check_axis_params(axis: Axis, prune_method: str, target: dict, latency_repeats: int, train: bool) -> None:
    """Refuse, before anything runs, an axis these params cannot measure: magnitude pruning and MACs; and, when
    the search would train (``train``), bytes or latency without the INT8 export (or without timing)."""
    if axis.name == "macs" and prune_method == "magnitude":
        raise FrontierError("--axis macs: prune.method magnitude removes no MACs (its zeros are still multiplied: "
                            "mac_reduction is 1.0 at every ratio); use prune.method l1_filter or channel, or "
                            "--axis compression or bytes")
    if not train or axis.name not in ("bytes", "latency"):
        return
    if "quantize.method" not in target:
        raise FrontierError(f"--axis {axis.name} needs runs that export INT8 (quantize.method ptq or qat), and these "
                            "params have no quantize.method (this kdprune does not export INT8)")
    if target["quantize.method"] not in INT8:
        raise FrontierError(f"--axis {axis.name}: quantize.method is {target['quantize.method']!r}, so the runs "
                            "would not export INT8; --set quantize.method=ptq (or qat)")
    if axis.name == "latency" and not latency_repeats:
        raise FrontierError("--axis latency: evaluate.latency_repeats is 0, so the runs would time nothing; "
                            "--set evaluate.latency_repeats=N (N > 0)")
