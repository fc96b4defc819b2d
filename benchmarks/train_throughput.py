"""Training throughput of kdprune's loop against a naive torchvision DataLoader pipeline.

Measures, in one run on this machine:
  (a) images/s of our training loop (kdprune.train.loop.fit: tensor-resident data, batched augmentation,
      the runtime settings from params.yaml);
  (b) images/s of the same model and batch size fed by torchvision's FashionMNIST Dataset + a
      DataLoader with PIL transforms (RandomCrop(padding), RandomHorizontalFlip, ToTensor, Normalize),
      at the best num_workers, in two flavours:
        b_naive: a plain fp32 NCHW training step (what a naive script does),
        b_datapath: our step (same memory format / autocast), so only the data path differs;
  (c) achieved training GFLOP/s = FlopCounterMode FLOPs of a fwd+bwd step x images/s, against the
      best measured fp32 matmul GFLOP/s of this machine. With runtime.bf16 the convs run in bf16,
      so (c) is also given against the bf16 matmul peak, and the loop is re-measured in fp32.
With --pipeline it also times `dvc repro` from a fresh clone (clean state, empty cache) and the
`dvc exp run -S prune.ratio=0.9` that follows.

  python benchmarks/train_throughput.py                 # throughput, ~2 minutes
  python benchmarks/train_throughput.py --pipeline      # + full pipeline timing, ~8 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprune import metrics  # noqa: E402
from kdprune.data import TensorLoader, prepare_dataset  # noqa: E402
from kdprune.models import build_model, spec_from_params  # noqa: E402
from kdprune.params import load_params  # noqa: E402
from kdprune.train.loop import fit  # noqa: E402
from kdprune.train.runtime import bf16_choice, setup_runtime  # noqa: E402


def matmul_peak_gflops(dtype=torch.float32, sizes=(1024, 2048, 3072), reps=5) -> float:
    """Best GFLOP/s of a square matmul over a few sizes (the machine's practical peak)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def train_step_flops_per_image(model, batch_size: int, input_shape) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch_size, *input_shape)
    y = torch.randint(0, 10, (batch_size,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def bench_ours(params, data, n_images: int) -> float:
    """Images/s of kdprune.train.loop.fit over one epoch of ``n_images`` (training time only)."""
    cfg = replace(params.teacher, epochs=1, eval_every=0)
    x, y = data["train_x"][:n_images], data["train_y"][:n_images]
    loader = TensorLoader(x, y, data["mean"], data["std"], cfg.batch_size, train=True,
                          crop_padding=params.data.crop_padding, hflip=data["hflip"], seed=0,
                          channels_last=params.runtime.channels_last)
    tiny_test = TensorLoader(x[:cfg.batch_size], y[:cfg.batch_size], data["mean"], data["std"], cfg.batch_size,
                             train=False)
    model = build_model(spec_from_params(params.model, x.shape[1], len(data["classes"])))
    warm = TensorLoader(x[:2 * cfg.batch_size], y[:2 * cfg.batch_size], data["mean"], data["std"], cfg.batch_size,
                        train=True, channels_last=params.runtime.channels_last)
    fit(model, warm, tiny_test, cfg, runtime=params.runtime, log=lambda m: None)  # warm-up (oneDNN primitives)
    hist = fit(model, loader, tiny_test, cfg, runtime=params.runtime, log=lambda m: None)
    return hist[-1]["images_per_second"]


def bench_naive(params, data, n_images: int, workers: int, our_step: bool, tmp: Path) -> float:
    """Images/s with torchvision's FashionMNIST Dataset + DataLoader + PIL transforms."""
    import torchvision
    from torchvision import transforms as T

    from kdprune.data import write_idx

    raw = tmp / "FashionMNIST" / "raw"
    if not raw.exists():  # torchvision's own on-disk layout, written from the same images
        raw.mkdir(parents=True)
        write_idx(raw / "train-images-idx3-ubyte", data["train_x"][:n_images, 0].numpy())
        write_idx(raw / "train-labels-idx1-ubyte", data["train_y"][:n_images].numpy().astype("uint8"))
        write_idx(raw / "t10k-images-idx3-ubyte", data["test_x"][:10, 0].numpy())
        write_idx(raw / "t10k-labels-idx1-ubyte", data["test_y"][:10].numpy().astype("uint8"))
    tf = T.Compose([T.RandomCrop(data["train_x"].shape[-1], padding=params.data.crop_padding),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(data["mean"], data["std"])])
    ds = torchvision.datasets.FashionMNIST(str(tmp), train=True, transform=tf, download=False)
    bs = params.teacher.batch_size
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    rt = params.runtime
    cl = our_step and rt.channels_last
    bf16 = our_step and bf16_choice(rt, torch.device("cpu"))[0]
    model = build_model(spec_from_params(params.model, data["train_x"].shape[1], len(data["classes"])))
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step(xb, yb):
        if cl:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    it = iter(loader)
    for _ in range(2):  # warm-up: worker start-up and oneDNN primitives
        step(*next(it))
    n, t = 0, time.perf_counter()
    for xb, yb in loader:
        step(xb, yb)
        n += len(yb)
    return n / (time.perf_counter() - t)


def time_pipeline(tmp: Path) -> dict:
    """Wall time of `dvc repro` in a fresh clone, then of `dvc exp run -S prune.ratio=0.9`."""
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = dict(os.environ, DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_SITE_CACHE_DIR=str(tmp / "site"))
    env.pop("DVC_ROOT", None)
    out = {}
    for key, cmd in (("repro_seconds", ["dvc", "repro"]),
                     ("exp_run_seconds", ["dvc", "exp", "run", "-S", "prune.ratio=0.9"])):
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
        out[key] = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        out[key.replace("seconds", "log")] = r.stdout
        if key == "repro_seconds":
            out["metrics_default"] = metrics.collect(clone)
            subprocess.run(["git", "add", "-A"], cwd=clone, env=env, check=True)
            subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@invalid", "commit", "-qm",
                            "bench baseline"], cwd=clone, env=env, check=True)
    out["metrics_ratio_0.9"] = metrics.collect(clone)
    out["exp_over_repro"] = out["exp_run_seconds"] / out["repro_seconds"]
    return out


def run(n_images: int = 20480, workers=(0, 1, 2), pipeline: bool = False, params_path: Path = ROOT / "params.yaml",
        data: dict | None = None, peak_sizes=(1024, 2048, 3072)) -> dict:
    """``peak_sizes``: the square matmuls that measure the peak GFLOP/s (smaller in the smoke test: a CPU
    without native bf16 takes minutes for bf16 at 3072)."""
    params = load_params(params_path)
    setup_runtime(params.runtime, params.seed)
    if data is None:
        data = prepare_dataset(params.data.name, params.data.root, False, 0, 0, params.seed)
    n_images = min(n_images, len(data["train_x"]))
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "n_images": n_images,
                 "batch_size": params.teacher.batch_size, "model": f"resnet{params.model.depth}-w{params.model.width}",
                 "runtime": vars(params.runtime)}
    res["fp32_peak_gflops"] = matmul_peak_gflops(torch.float32, peak_sizes)
    res["bf16_peak_gflops"] = matmul_peak_gflops(torch.bfloat16, peak_sizes)
    model = build_model(spec_from_params(params.model, data["train_x"].shape[1], len(data["classes"])))
    res["train_flops_per_image"] = train_step_flops_per_image(model, 8, tuple(data["train_x"].shape[1:]))
    res["bf16"], res["bf16_why"] = bf16_choice(params.runtime, torch.device("cpu"))  # which way (a) ran, and why
    res["a_ours_img_s"] = bench_ours(params, data, n_images)
    fp32 = replace(params, runtime=replace(params.runtime, bf16=False))
    res["a_ours_fp32_img_s"] = bench_ours(fp32, data, n_images) if res["bf16"] else res["a_ours_img_s"]
    with tempfile.TemporaryDirectory() as tmp:
        naive = {w: bench_naive(params, data, n_images, w, our_step=False, tmp=Path(tmp)) for w in workers}
        best_w = max(naive, key=naive.get)
        res["b_naive_img_s_by_workers"] = naive
        res["b_naive_best_workers"] = best_w
        res["b_naive_img_s"] = naive[best_w]
        res["b_datapath_img_s"] = bench_naive(params, data, n_images, best_w, our_step=True, tmp=Path(tmp))
        if pipeline:
            res["pipeline"] = time_pipeline(Path(tmp))
    res["a_over_b_naive"] = res["a_ours_img_s"] / res["b_naive_img_s"]
    res["a_over_b_datapath"] = res["a_ours_img_s"] / res["b_datapath_img_s"]
    res["c_achieved_gflops"] = res["train_flops_per_image"] * res["a_ours_img_s"] / 1e9
    res["c_over_fp32_peak"] = res["c_achieved_gflops"] / res["fp32_peak_gflops"]
    res["c_over_bf16_peak"] = res["c_achieved_gflops"] / res["bf16_peak_gflops"]
    res["c_fp32_achieved_gflops"] = res["train_flops_per_image"] * res["a_ours_fp32_img_s"] / 1e9
    res["c_fp32_over_fp32_peak"] = res["c_fp32_achieved_gflops"] / res["fp32_peak_gflops"]
    return res


def report(res: dict) -> str:
    lines = [
        f"machine: {res['machine']}, torch {res['torch']}, {res['threads']} threads",
        f"model {res['model']}, batch {res['batch_size']}, {res['n_images']} images, runtime {res['runtime']}",
        f"fp32 matmul peak: {res['fp32_peak_gflops']:.1f} GFLOP/s   (bf16: {res['bf16_peak_gflops']:.1f})",
        f"(a) ours, bf16 autocast {'on' if res['bf16'] else 'off'} ({res['bf16_why']}): {res['a_ours_img_s']:.0f} img/s",
        f"(b) naive DataLoader, plain fp32 step:     {res['b_naive_img_s']:8.0f} img/s  "
        f"(num_workers={res['b_naive_best_workers']}; by workers: "
        + ", ".join(f"{w}: {v:.0f}" for w, v in res["b_naive_img_s_by_workers"].items()) + ")",
        f"    naive DataLoader, our step:            {res['b_datapath_img_s']:8.0f} img/s",
        f"a/b (vs naive pipeline):                   {res['a_over_b_naive']:8.2f}x",
        f"a/b (data path only, same step):           {res['a_over_b_datapath']:8.2f}x",
        f"(c) achieved: {res['train_flops_per_image'] / 1e6:.1f} MFLOP/img x {res['a_ours_img_s']:.0f} img/s = "
        f"{res['c_achieved_gflops']:.1f} GFLOP/s = {100 * res['c_over_fp32_peak']:.0f} % of fp32 peak "
        f"({100 * res['c_over_bf16_peak']:.0f} % of bf16 peak)",
        f"    same loop with runtime.bf16=false:    {res['a_ours_fp32_img_s']:8.0f} img/s = "
        f"{res['c_fp32_achieved_gflops']:.1f} GFLOP/s = {100 * res['c_fp32_over_fp32_peak']:.0f} % of fp32 peak",
    ]
    if "pipeline" in res:
        p = res["pipeline"]
        m, m9 = p["metrics_default"], p["metrics_ratio_0.9"]
        lines += [
            f"dvc repro (fresh clone, empty cache):      {p['repro_seconds']:8.1f} s  "
            f"teacher {m['acc_teacher']:.2f} %, kd {m['acc_kd']:.2f} %, finetune {m['acc_finetune']:.2f} % "
            f"at {m['prunable_compression_ratio']:.1f}x prunable",
            f"dvc exp run -S prune.ratio=0.9:            {p['exp_run_seconds']:8.1f} s  "
            f"= {p['exp_over_repro']:.2f}x of repro; kd {m9['acc_kd']:.2f} %, finetune {m9['acc_finetune']:.2f} %, "
            f"pruned {m9['acc_pruned']:.2f} %, {m9['compression_ratio']:.2f}x "
            f"(prunable {m9['prunable_compression_ratio']:.2f}x)",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20480, help="training images per throughput measurement")
    ap.add_argument("--pipeline", action="store_true", help="also time dvc repro + dvc exp run in a fresh clone")
    ap.add_argument("--json", type=Path, help="write all figures to this JSON file")
    args = ap.parse_args()
    res = run(args.images, pipeline=args.pipeline)
    print(report(res))
    if args.json:
        slim = {k: v for k, v in res.items()}
        if "pipeline" in slim:
            slim["pipeline"] = {k: v for k, v in slim["pipeline"].items() if not k.endswith("_log")}
        args.json.write_text(json.dumps(slim, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
