"""Channel pruning of torchvision models (``prune.method: channel``) at about 2x fewer MACs: does the CPU
latency fall as much as the MACs?

For each model (1000 classes, random weights: speed does not depend on the values), prune with Torch-Pruning's
dependency graph and L1 importance until the MACs at the input size fall by ``--target`` (``prune.target_macs_
reduction``), then time the forward pass of the dense and the pruned model at batch 1 and batch 128 on CPU
(fp32, eval, channels_last like evaluate's default, the current thread count; median of interleaved repeats
after warm-up; kdprune.measure.latency_ms). Reported: MAC reduction reached, latency speed-up at each batch,
and speed-up / MAC reduction.

  python benchmarks/channel_speedup.py                       # resnet18 mobilenet_v2 efficientnet_b0 vgg11_bn, 224x224
  python benchmarks/channel_speedup.py --models resnet18 --side 112 --repeats 3 --threads 1 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprune.measure import latency_ms  # noqa: E402
from kdprune.models import build_model, record_pruning  # noqa: E402
from kdprune.prune.counts import count_params  # noqa: E402
from kdprune.prune.channel import channel_prune  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0", "vgg11_bn")


def run(models=MODELS, side: int = 224, target: float = 2.0, batches=(1, 128), repeats: int = 5, classes: int = 1000,
        importance: str = "l1") -> dict:
    torch.manual_seed(0)
    shape = (3, side, side)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(),
           "input_shape": list(shape), "target_macs_reduction": target, "importance": importance, "models": {}}
    for name in models:
        dense = build_model({"arch": "torchvision", "name": name, "num_classes": classes, "in_channels": 3}).eval()
        pruned = copy.deepcopy(dense)
        t0 = time.perf_counter()
        result = channel_prune(pruned, torch.zeros(1, *shape), importance, target_macs_reduction=target)
        record_pruning(pruned, result.history, shape)
        rec = {"prune_seconds": round(time.perf_counter() - t0, 1), "channel_ratio": result.ratio,
               "macs_dense": result.macs_before, "macs_pruned": result.macs_after,
               "mac_reduction": result.mac_reduction, "params_dense": count_params(dense)[0],
               "params_pruned": count_params(pruned)[0]}
        for m in (dense, pruned):
            m.to(memory_format=torch.channels_last)
        for b in batches:
            ms = latency_ms({"dense": dense, "pruned": pruned}, shape, b, repeats, warmup=1 if b > 1 else 3,
                            channels_last=True)
            rec[f"b{b}_dense_ms"], rec[f"b{b}_pruned_ms"] = ms["dense"], ms["pruned"]
            rec[f"b{b}_speedup"] = ms["dense"] / ms["pruned"]
            rec[f"b{b}_speedup_per_mac_reduction"] = rec[f"b{b}_speedup"] / rec["mac_reduction"]
        out["models"][name] = rec
        print(row(name, rec, batches), flush=True)
    return out


def header(batches) -> str:
    cols = ["model", "ratio", "params M", "GMACs", "MACs /"]
    for b in batches:
        cols += [f"b{b} ms dense -> pruned", f"b{b} speed-up", f"b{b} speed-up / MACs"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def row(name: str, r: dict, batches) -> str:
    cells = [name, f"{r['channel_ratio']:.3f}", f"{r['params_dense'] / 1e6:.1f} -> {r['params_pruned'] / 1e6:.1f}",
             f"{r['macs_dense'] / 1e9:.2f} -> {r['macs_pruned'] / 1e9:.2f}", f"{r['mac_reduction']:.2f}x"]
    for b in batches:
        cells += [f"{r[f'b{b}_dense_ms']:.1f} -> {r[f'b{b}_pruned_ms']:.1f}", f"{r[f'b{b}_speedup']:.2f}x",
                  f"{r[f'b{b}_speedup_per_mac_reduction']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def report(res: dict, batches=(1, 128)) -> str:
    lines = [f"torch {res['torch']}, {res['threads']} threads, input {res['input_shape']}, "
             f"target MAC reduction {res['target_macs_reduction']}, importance {res['importance']}", header(batches)]
    lines += [row(n, r, batches) for n, r in res["models"].items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a.models, a.side, a.target, tuple(a.batches), a.repeats)
    print(report(res, tuple(a.batches)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
