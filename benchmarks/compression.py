"""What structured and unstructured pruning buy at deployment, measured on this machine.

  (1) l1_filter speed: for each model, prune half of every block's inner filters (``prune.ratio:
      0.5``, which about halves the MACs), then time the forward pass of the teacher and of the
      pruned model at batch 1 and batch 128 on CPU (fp32, eval, the runtime's memory format, all
      cores; median of interleaved repeats after warm-up), in eager channels_last (what evaluate
      measures), eager NCHW and compiled (torch.compile of the BN-folded graph). Reported: MAC
      reduction, latency speed-up and their ratio (target: speed-up >= 0.8 x MAC reduction at batch 128).
  (2) magnitude speed: the same timing for 90 % unstructured sparsity, to show that zeros in dense
      kernels buy nothing.
  (3) compact size: the compact export (bitmask + fp16 non-zeros) at 90 % unstructured sparsity,
      against its bound 2 bytes x non-zeros + 1 bit per weight (target: <= 1.25x) and against the
      dense checkpoint.

  python benchmarks/compression.py                      # default model, width 32, ResNet-20/56; ~3 min
  python benchmarks/compression.py --modes eager --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprune import checkpoint, io  # noqa: E402
from kdprune.export import compact_bound_bytes, export_compact  # noqa: E402
from kdprune.measure import fold_batchnorm, latency_ms  # noqa: E402
from kdprune.prune.counts import dense_macs  # noqa: E402
from kdprune.models import build_model, resnet_spec, spec_of  # noqa: E402
from kdprune.prune.filters import l1_filter_prune  # noqa: E402
from kdprune.prune.masks import apply_masks, global_magnitude_masks  # noqa: E402

CASES = [  # (name, depth, width, input shape)
    ("resnet8-w16 1x28x28 (default)", 8, 16, (1, 28, 28)),
    ("resnet8-w32 1x28x28", 8, 32, (1, 28, 28)),
    ("resnet20-w16 3x32x32", 20, 16, (3, 32, 32)),
    ("resnet20-w32 3x32x32", 20, 32, (3, 32, 32)),
    ("resnet56-w16 3x32x32", 56, 16, (3, 32, 32)),
]
MODES = ("eager", "eager_nchw", "compiled")  # compiled: torch.compile of the BN-folded eval graph


def interleaved_latency_ms(models: dict, shape: tuple, batch: int, repeats: int, warmup: int = 3,
                           channels_last: bool = True) -> dict[str, float]:
    """kdprune.measure.latency_ms (the models take turns) with the models in the matching memory format."""
    for m in models.values():
        m.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return latency_ms(models, shape, batch, repeats, warmup, channels_last)


def structured_case(depth: int, width: int, shape: tuple, repeats: int, ratio: float = 0.5,
                    modes: tuple = ("eager",)) -> dict:
    """Latency of the teacher, its l1_filter-pruned model and its 90 %-magnitude-pruned model.

    Modes: ``eager`` (PyTorch eager, channels_last: what evaluate measures), ``eager_nchw`` (eager,
    default memory format), ``compiled`` (``torch.compile`` of the BN-folded eval graph, channels_last;
    compile time excluded).
    """
    torch.manual_seed(0)
    teacher = build_model(resnet_spec(depth, width, shape[0], 10)).eval()
    pruned = build_model(teacher.spec)
    pruned.load_state_dict(teacher.state_dict())
    l1_filter_prune(pruned, ratio, torch.zeros(1, *shape))
    small = build_model(spec_of(pruned)).eval()
    small.load_state_dict(pruned.state_dict())
    sparse = build_model(teacher.spec).eval()
    sparse.load_state_dict(teacher.state_dict())
    apply_masks(sparse, global_magnitude_masks(sparse, 0.9))
    mac_red = dense_macs(teacher, shape) / dense_macs(small, shape)
    out = {"mac_reduction": mac_red, "params_teacher": sum(p.numel() for p in teacher.parameters()),
           "params_l1_filter": sum(p.numel() for p in small.parameters())}
    for mode in modes:
        models = {"teacher": teacher, "l1_filter": small, "magnitude90": sparse}
        if mode == "compiled":
            models = {k: torch.compile(fold_batchnorm(m)) for k, m in models.items()}
        for batch, reps in ((1, repeats * 5), (128, repeats)):
            lat = interleaved_latency_ms(models, shape, batch, reps, channels_last=mode != "eager_nchw")
            r = {**{f"{k}_ms": v for k, v in lat.items()}, "speedup_l1_filter": lat["teacher"] / lat["l1_filter"],
                 "speedup_magnitude90": lat["teacher"] / lat["magnitude90"]}
            r["speedup_over_mac_reduction"] = r["speedup_l1_filter"] / mac_red
            out[f"{mode}_b{batch}"] = r
    return out


def compact_case(depth: int, width: int, shape: tuple, sparsity: float = 0.9) -> dict:
    torch.manual_seed(0)
    model = build_model(resnet_spec(depth, width, shape[0], 10))
    masks = global_magnitude_masks(model, sparsity)
    apply_masks(model, masks)
    with tempfile.TemporaryDirectory() as d:
        compact = export_compact(model, Path(d) / "m.kdc")
        checkpoint.save_checkpoint(Path(d) / "m.pt", model, masks)
        dense = (Path(d) / "m.pt").stat().st_size
    bound = compact_bound_bytes(model)
    return {"bytes_compact": compact, "bytes_bound": bound, "compact_over_bound": compact / bound,
            "bytes_dense_checkpoint": dense, "dense_over_compact": dense / compact}


def run(repeats: int = 30, cases=CASES, modes=("eager",)) -> dict:
    res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                      f"torch {torch.__version__}", "modes": list(modes), "cases": {}}
    for name, depth, width, shape in cases:
        res["cases"][name] = {"structured": structured_case(depth, width, shape, repeats, modes=modes),
                              "compact_90": compact_case(depth, width, shape)}
    return res


def report(res: dict) -> str:
    lines = [f"# {res['machine']}"]
    for name, c in res["cases"].items():
        s, k = c["structured"], c["compact_90"]
        lines.append(f"{name}: l1_filter 0.5 params {s['params_teacher']:,} -> {s['params_l1_filter']:,}, "
                     f"MACs / {s['mac_reduction']:.2f}")
        for b in [f"{m}_b{n}" for m in res["modes"] for n in (1, 128)]:
            r = s[b]
            lines.append(f"  {b}: teacher {r['teacher_ms']:.3f} ms, l1_filter {r['l1_filter_ms']:.3f} ms "
                         f"(speed-up {r['speedup_l1_filter']:.2f}x = {r['speedup_over_mac_reduction']:.2f} x MAC "
                         f"reduction), magnitude 90 % {r['magnitude90_ms']:.3f} ms (speed-up {r['speedup_magnitude90']:.2f}x)")
        lines.append(f"  compact at 90 % sparsity: {k['bytes_compact']:,} B = {k['compact_over_bound']:.3f} x bound "
                     f"({k['bytes_bound']:,} B); dense checkpoint {k['bytes_dense_checkpoint']:,} B "
                     f"({k['dense_over_compact']:.1f}x larger)")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30, help="timed batch-128 passes per model (batch 1: 5x)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--modes", default="eager,eager_nchw,compiled", help=f"comma-separated, of {MODES}")
    args = ap.parse_args()
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {MODES}")
    result = run(args.repeats, modes=modes)
    print(report(result))
    if args.json:
        io.write_json(args.json, result)
