"""INT8 through onnxruntime: accuracy, bytes and latency of the shipped files against their fp32 ONNX files.

Two parts (either or both):

``--pipeline DIR`` (default: off): a finished default pipeline (``dvc repro``) in DIR. For the teacher and every
student: the test accuracy of the fp32 and the INT8 file through onnxruntime (metrics/evaluate.json: measured by
the evaluate stage over the whole test split), their bytes, and onnxruntime latency at batch 1 and 128 (``--rounds``
rounds of ``--repeats`` interleaved runs each; the median of each round, then the median and range over rounds).
It also quantizes the teacher again with the first conv, the classifier, or both left in fp32, to see whether
excluding them pays (calibration and test as the evaluate stage does them).

``--resnet18``: torchvision's resnet18 (10 classes) at ``--side`` px, channel-pruned to ``--target`` x fewer MACs
(prune.method channel, Torch-Pruning, L1), exported and quantized as the pipeline does. Random weights, so there is
no accuracy to report: bytes and latency only, with the fraction of random inputs whose INT8 top-1 equals the fp32
top-1 as a sanity figure (labelled so). The dense fp32 file is the reference of every speed-up.

Every figure is measured on this machine: the JSON records the CPU, the thread count, onnxruntime's version and
the CPU busy fraction before timing.

  python benchmarks/int8_deploy.py --pipeline . --resnet18 --json benchmarks/results/int8.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprune.data import TensorLoader, load_prepared  # noqa: E402
from kdprune.deploy import int8, ort, ship  # noqa: E402
from kdprune.export import export_onnx  # noqa: E402
from kdprune.io import read_json  # noqa: E402
from kdprune.measure import cpu_busy_fraction, cpu_model  # noqa: E402
from kdprune.models import build_model, record_pruning  # noqa: E402
from kdprune.prune.channel import channel_prune  # noqa: E402
from kdprune.stage import train_eval_indices  # noqa: E402


def timed(sessions: dict, shape: tuple, rounds: int, repeats: int) -> dict:
    """Per session and batch: median over rounds of each round's median ms, and the rounds' min and max."""
    out: dict = {}
    for batch in (1, 128):
        per_round = [ort.latency_ms(sessions, shape, batch, repeats, seed=r) for r in range(rounds)]
        for k in sessions:
            v = [r[k] for r in per_round]
            out[f"{k}_b{batch}_ms"] = statistics.median(v)
            out[f"{k}_b{batch}_ms_range"] = [min(v), max(v)]
    return out


def pipeline_part(root: Path, rounds: int, repeats: int, threads: int) -> dict:
    export, metrics = root / "models" / "export", read_json(root / "metrics" / "evaluate.json")
    names = [p.name.removesuffix(".onnx") for p in sorted(export.glob("*.onnx")) if not p.name.endswith(".int8.onnx")]
    rec: dict = {"models": {}}
    sessions = {}
    for n in names:
        sessions[f"{n}_fp32"] = ort.session(export / f"{n}.onnx", threads)
        sessions[f"{n}_int8"] = ort.session(int8.int8_path(export / f"{n}.onnx"), threads)
        rec["models"][n] = {k: metrics.get(f"{k}_{n}") for k in ("acc", "bytes_onnx", "bytes_onnx_int8",
                                                                  "bytes_onnx_gzip", "bytes_onnx_int8_gzip")}
        rec["models"][n].update(acc_onnx=metrics.get(f"acc_{n}_onnx"), acc_int8=metrics.get(f"acc_{n}_int8"))
    data = load_prepared(root / "data" / "prepared" / "dataset.pt")
    shape = tuple(data["train_x"].shape[1:])
    rec["latency"] = lat = timed(sessions, shape, rounds, repeats)
    for n in names:
        m = rec["models"][n]
        m["int8_minus_fp32_pt"] = m["acc_int8"] - m["acc_onnx"]
        m["bytes_int8_over_fp32"] = m["bytes_onnx_int8"] / m["bytes_onnx"]
        for b in (1, 128):
            m[f"int8_speedup_b{b}"] = lat[f"{n}_fp32_b{b}_ms"] / lat[f"{n}_int8_b{b}_ms"]
    # excluding the first conv and/or the classifier from INT8: does it pay?
    idx = train_eval_indices(len(data["train_y"]), 512)
    cal = TensorLoader(data["train_x"][idx], data["train_y"][idx], data["mean"], data["std"], 256, train=False)
    test = TensorLoader(data["test_x"], data["test_y"], data["mean"], data["std"], 500, train=False)
    rec["exclusions"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        import onnx  # heavy optional dependency: the node names of the graph

        graph = onnx.load(str(export / "teacher.onnx")).graph
        convs = [nd.name for nd in graph.node if nd.op_type == "Conv"]
        fcs = [nd.name for nd in graph.node if nd.op_type in ("Gemm", "MatMul")]
        variants = {"none": [], "first_conv": convs[:1], "classifier": fcs[-1:], "both": convs[:1] + fcs[-1:]}
        excl_sessions = {}
        for label, nodes in variants.items():
            q = int8.quantize(export / "teacher.onnx", (x for x, _ in ship.torch_batches(cal)),
                              out_path=Path(tmp) / f"{label}.onnx", exclude=nodes)
            acc, _ = ort.accuracy(ort.session(q, threads), ship.torch_batches(test))
            excl_sessions[label] = ort.session(q, threads)
            rec["exclusions"][label] = {"excluded_nodes": nodes, "acc_int8": acc, "bytes": q.stat().st_size}
        lat_x = timed(excl_sessions, shape, rounds, repeats)
        for label in variants:
            rec["exclusions"][label].update({f"b{b}_ms": lat_x[f"{label}_b{b}_ms"] for b in (1, 128)})
    return rec


def resnet18_part(side: int, target: float, rounds: int, repeats: int, threads: int) -> dict:
    torch.manual_seed(0)
    shape = (3, side, side)
    dense = build_model({"arch": "torchvision", "name": "resnet18", "num_classes": 10, "in_channels": 3}).eval()
    pruned = copy.deepcopy(dense)
    result = channel_prune(pruned, torch.zeros(1, *shape), "l1", target_macs_reduction=target)
    record_pruning(pruned, result.history, shape)
    pruned.eval()
    rng = np.random.default_rng(0)
    cal = [rng.standard_normal((16, *shape), dtype=np.float32) for _ in range(8)]
    probe = rng.standard_normal((64, *shape), dtype=np.float32)
    rec: dict = {"input_shape": list(shape), "mac_reduction": result.mac_reduction, "channel_ratio": result.ratio,
                 "macs_dense": result.macs_before, "macs_pruned": result.macs_after, "models": {}}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("dense", dense), ("pruned", pruned)):
            fp32 = Path(tmp) / f"{name}.onnx"
            export_onnx(model, fp32, shape)
            q = int8.quantize(fp32, iter(cal))
            s32, s8 = ort.session(fp32, threads), ort.session(q, threads)
            sessions[f"{name}_fp32"], sessions[f"{name}_int8"] = s32, s8
            agree = float((ort.run_logits(s32, probe).argmax(1) == ort.run_logits(s8, probe).argmax(1)).mean())
            rec["models"][name] = {"bytes_fp32": fp32.stat().st_size, "bytes_int8": q.stat().st_size,
                                   "bytes_int8_gzip": int8.gzip_bytes(q),
                                   "top1_agreement_int8_vs_fp32_random_inputs": agree}
        rec["latency"] = lat = timed(sessions, shape, rounds, repeats)
    for k in sessions:
        for b in (1, 128):
            rec[f"speedup_b{b}_{k}_vs_dense_fp32"] = lat[f"dense_fp32_b{b}_ms"] / lat[f"{k}_b{b}_ms"]
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, help="a finished default pipeline's directory")
    ap.add_argument("--resnet18", action="store_true", help="the channel-pruned resnet18 part")
    ap.add_argument("--side", type=int, default=112)
    ap.add_argument("--target", type=float, default=2.0, help="MAC reduction of the resnet18 (default 2x)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    ap.add_argument("--json", type=Path, help="write the record here")
    args = ap.parse_args(argv)
    threads = args.threads or None
    out = {"cpu": cpu_model(), "onnxruntime": ort.version(), "threads": args.threads or "all cores",
           "rounds": args.rounds, "repeats": args.repeats, "cpu_busy_fraction_before": cpu_busy_fraction(1.0)}
    if args.pipeline:
        out["pipeline"] = pipeline_part(args.pipeline, args.rounds, args.repeats, threads)
    if args.resnet18:
        out["resnet18"] = resnet18_part(args.side, args.target, args.rounds, args.repeats, threads)
    out["cpu_busy_fraction_after"] = cpu_busy_fraction(1.0)
    text = json.dumps(out, indent=2, sort_keys=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
