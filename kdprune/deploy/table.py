"""The deployment table of one run: for the teacher and each student, fp32 and INT8, what a deployment engineer
asks first. Accuracy through onnxruntime, bytes of the ONNX file and of its gzip, onnxruntime latency at batch
1 and 128, and the speed-up against the fp32 teacher's file.

Latencies vary from run to run and with the machine's load: the table says how they were measured (threads, the
CPU busy fraction before timing) and lives in logs/ (not a DVC output, logged to MLflow by the track stage).
A student pruned without removing channels (``prune.method: magnitude``) is labelled "size only": no dense
runtime turns its zeros into speed, only gzip into bytes.
"""
from __future__ import annotations

import csv
import io as _stdio
import math

COLUMNS = ("model", "format", "acc_ort", "bytes", "bytes_gzip", "latency_b1_ms", "latency_b128_ms",
           "speedup_b1", "speedup_b128", "note")


def rows(names: list[str], metrics: dict, latency: dict, structured: bool, int8: bool) -> list[dict]:
    """One row per model and format; ``metrics``: evaluate.json's keys, ``latency``: logs/latency.json's
    ``ort_latency_b<k>_ms_<name>[_int8]``. Missing latencies (evaluate.latency_repeats: 0) give empty cells."""
    out = []
    for name in names:
        for fmt in ("fp32", "int8") if int8 else ("fp32",):
            suffix = "" if fmt == "fp32" else "_int8"
            row = {"model": name, "format": fmt, "acc_ort": metrics.get(f"acc_{name}_{'onnx' if fmt == 'fp32' else 'int8'}"),
                   "bytes": metrics.get(f"bytes_onnx{suffix}_{name}"),
                   "bytes_gzip": metrics.get(f"bytes_onnx{suffix}_gzip_{name}")}
            for b in (1, 128):
                ms = latency.get(f"ort_latency_b{b}_ms_{name}{suffix}")
                ref = latency.get(f"ort_latency_b{b}_ms_teacher")
                row[f"latency_b{b}_ms"] = ms
                row[f"speedup_b{b}"] = ref / ms if ms and ref else None
            row["note"] = ("reference" if name == "teacher" and fmt == "fp32"
                           else "" if name == "teacher" or structured else "size only")
            out.append(row)
    return out


def _cell(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def to_csv(table: list[dict]) -> str:
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({k: _cell(r[k], 4) for k in COLUMNS})
    return buf.getvalue()


def to_markdown(table: list[dict], context: str) -> str:
    """The table as markdown, under one line of context (what ran where, under what load)."""
    head = ["model", "format", "accuracy (ORT, %)", "bytes", "gzip bytes", "latency b1 (ms)", "latency b128 (ms)",
            "speed-up b1", "speed-up b128", "note"]
    lines = [context, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["model"], r["format"], _cell(r["acc_ort"]), f"{r['bytes']:,}" if r["bytes"] else "",
                 f"{r['bytes_gzip']:,}" if r["bytes_gzip"] else "", _cell(r["latency_b1_ms"], 3),
                 _cell(r["latency_b128_ms"], 2), _cell(r["speedup_b1"]) + ("x" if r["speedup_b1"] else ""),
                 _cell(r["speedup_b128"]) + ("x" if r["speedup_b128"] else ""), r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
