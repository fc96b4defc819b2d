"""Running exported files with onnxruntime (CPU): accuracy over a split, latency at a batch size.

The accuracy is that of the file a user ships, fed the very batches the pipeline's torch evaluation gets
(kdprune.stage.test_loader: eval transforms, normalised), so ``acc_<model>_onnx`` and torch's ``acc_<model>``
measure the same function of the same inputs; evaluate requires them to agree within 0.1 pt.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Iterable

import numpy as np


def version() -> str:
    import onnxruntime as ort  # heavy optional dependency: only where exported files run

    return ort.__version__


def session(path: str | os.PathLike, threads: int | None = None):
    """A CPU InferenceSession of ``path`` with all graph optimisations (``threads``: intra-op threads; None =
    onnxruntime's default, all cores)."""
    import onnxruntime as ort  # heavy optional dependency: only where exported files run

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: no per-session warnings about unused initialisers
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_logits(sess, x: np.ndarray) -> np.ndarray:
    inp = sess.get_inputs()[0].name
    return sess.run(None, {inp: np.ascontiguousarray(x, dtype=np.float32)})[0]


def accuracy(sess, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, int]:
    """(top-1 accuracy in percent, images seen) of the session over ``(inputs, labels)`` batches. Non-finite
    logits count as wrong (a broken file must never score)."""
    correct = total = 0
    for x, y in batches:
        logits = run_logits(sess, x)
        ok = np.isfinite(logits).all(axis=1) & (logits.argmax(axis=1) == np.asarray(y))
        correct += int(ok.sum())
        total += len(y)
    return (100.0 * correct / total if total else float("nan")), total


def latency_ms(sessions: dict, input_shape: tuple[int, ...], batch: int, repeats: int, warmup: int = 3,
               seed: int = 0) -> dict[str, float]:
    """Median wall milliseconds of one run of a ``batch`` of random inputs, per session, over ``repeats`` timed
    runs after ``warmup``; the sessions take turns run by run, so drift on a shared machine hits them alike."""
    x = np.random.default_rng(seed).standard_normal((batch, *input_shape), dtype=np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    return {k: 1000.0 * statistics.median(v) for k, v in times.items()}
