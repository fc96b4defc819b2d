"""Image folders: the streaming path's throughput against a plain torchvision pipeline, and its peak memory.

Measures, in one run, on a generated folder of JPEGs of 200-320 px (ImageFolder layout, ImageNet-like sizes):
  (a) images/s through kdprune's streaming loader (``kdprune.data.streaming.StreamLoader``: decode + resize + centre
      crop in DataLoader workers, pad-and-random-crop + flip, normalised float batches), train split, one epoch
      after the workers have started, at num_workers 0, 1, 2, 4;
  (b) images/s of a plain torchvision ``ImageFolder`` + ``DataLoader`` with the same transforms as PIL transforms
      (Resize, CenterCrop, RandomCrop(padding), RandomHorizontalFlip, ToTensor, Normalize), at the same
      num_workers; the figure compared is each one's best;
  (c) peak memory while the streaming path trains a few steps (a small CNN with a stride-4 stem, SGD, batches
      from ``kdprune.stage.train_loader``) on folders larger than ``data.memory_budget_mb``, with the budget set
      low so that ``auto`` picks streaming: peak RSS of the main process (VmHWM) and the peak over time of the
      summed RSS and PSS of the main process and its workers, for two folder sizes (the figures must not grow
      with the folder). The model is small so that the figures are those of the data path, not of activations;
      the RSS before the first batch (torch, the model, the index) is given as the baseline.

  python benchmarks/imagefolder_throughput.py                 # a few minutes on 2 cores
  python benchmarks/imagefolder_throughput.py --images 4000 --workers 0 1 2 4 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprune.data import imagefolder, streaming  # noqa: E402

IMAGE_SIZE, RESIZE, PAD, BATCH = 112, 128, 4, 64


def make_folder(root: Path, n_images: int, classes: int = 10, seed: int = 0) -> Path:
    """``n_images`` JPEGs (80 % train, 20 % val) of 200-320 px with smooth content (so JPEG sizes are realistic)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n_images):
        split = "val" if i % 5 == 4 else "train"
        d = root / split / f"class{i // 5 % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(200, 321, size=2))
        small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-12, 13, size=(h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        img.save(d / f"{i:06d}.jpg", quality=90)
    return root


def _timed(loader, skip: int = 2) -> float:
    """Images/s over one epoch, not counting the first ``skip`` batches (worker start-up)."""
    n, t0 = 0, None
    for k, (x, _) in enumerate(loader):
        if k == skip - 1:
            t0 = time.perf_counter()
        elif k >= skip:
            n += len(x)
    return n / (time.perf_counter() - t0) if t0 is not None and n else float("nan")


def plain_loader(root: Path, workers: int, mean, std, batch: int = BATCH):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(IMAGE_SIZE),
                             transforms.RandomCrop(IMAGE_SIZE, padding=PAD), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "train"), transform=tf), batch_size=batch,
                                       shuffle=True, num_workers=workers, persistent_workers=workers > 0)


def run_throughput(root: Path, workers=(0, 1, 2, 4), batch: int = BATCH) -> dict:
    data = imagefolder.prepare(str(root), image_size=IMAGE_SIZE, resize_size=RESIZE, loader="stream")
    files = streaming.split_files(data, "train")
    res = {"train_images": len(data["train_y"]), "batch": batch, "stream_img_s": {}, "plain_img_s": {}}
    for w in workers:
        ld = streaming.StreamLoader(files, data["preprocessing"], data["train_y"], data["mean"], data["std"], batch,
                                    train=True, crop_padding=PAD, hflip=True, num_workers=w)
        res["stream_img_s"][w] = _timed(ld)
        del ld
        res["plain_img_s"][w] = _timed(plain_loader(root, w, data["mean"], data["std"], batch))
    res["stream_best"] = max(res["stream_img_s"].items(), key=lambda kv: kv[1])
    res["plain_best"] = max(res["plain_img_s"].items(), key=lambda kv: kv[1])
    res["ratio"] = res["stream_best"][1] / res["plain_best"][1]
    return res


# ---- memory ----

def _proc_kb(pid: int, field: str, file: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class MemoryMonitor(threading.Thread):
    """Samples the summed RSS and PSS of this process and its children every ``period`` s; keeps the peaks."""

    def __init__(self, period: float = 0.05):
        super().__init__(daemon=True)
        self.period, self.peak_rss_kb, self.peak_pss_kb, self.stop = period, 0, 0, threading.Event()

    def run(self):
        me = os.getpid()
        while not self.stop.is_set():
            pids = [me, *_children(me)]
            self.peak_rss_kb = max(self.peak_rss_kb, sum(_proc_kb(p, "VmRSS") for p in pids))
            self.peak_pss_kb = max(self.peak_pss_kb, sum(_proc_kb(p, "Pss", "smaps_rollup") for p in pids))
            self.stop.wait(self.period)


def rss_child(root: Path, budget_mb: int, steps: int, workers: int, batch: int = BATCH) -> dict:
    """In a fresh process: prepare with data.loader auto and a low budget, then train ``steps`` steps."""
    from kdprune import stage
    from kdprune.params import DataParams, Params, RuntimeParams, TeacherParams

    monitor = MemoryMonitor()
    monitor.start()
    params = Params(data=DataParams(name="imagefolder", root=str(root), image_size=IMAGE_SIZE, resize_size=RESIZE,
                                    memory_budget_mb=budget_mb, num_workers=workers, loader="auto", crop_padding=PAD),
                    teacher=TeacherParams(batch_size=batch), runtime=RuntimeParams(channels_last=False))
    params.validate()
    params.data.validate("data")
    d = params.data
    data = imagefolder.prepare(d.root, image_size=d.image_size, resize_size=d.resize_size, loader=d.loader,
                               memory_budget_mb=d.memory_budget_mb, num_workers=d.num_workers)
    loader = stage.train_loader(params, data, params.teacher)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(data["train_x"].shape[1], 32, 7, stride=4, padding=3), nn.BatchNorm2d(32),
                          nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, len(data["classes"])))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    baseline_kb = _proc_kb(os.getpid(), "VmRSS")
    t0, done = time.perf_counter(), 0
    while done < steps:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    seconds = time.perf_counter() - t0
    monitor.stop.set()
    monitor.join()
    n = len(data["train_y"]) + len(data["test_y"])
    return {"loader": data["loader"], "images": n, "budget_mb": budget_mb,
            "decoded_mb": imagefolder.decoded_bytes(n, data["train_x"].shape[1], IMAGE_SIZE) / 2**20,
            "steps": steps, "seconds": seconds, "workers": workers, "rss_before_mb": baseline_kb / 1024,
            "vmhwm_main_mb": _proc_kb(os.getpid(), "VmHWM") / 1024,
            "peak_rss_sum_mb": monitor.peak_rss_kb / 1024, "peak_pss_sum_mb": monitor.peak_pss_kb / 1024}


def run_rss(root: Path, budget_mb: int, steps: int, workers: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--rss-child", str(root), "--budget", str(budget_mb),
                        "--steps", str(steps), "--rss-workers", str(workers)],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError(f"memory run failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(n_images: int = 2000, workers=(0, 1, 2, 4), rss_images=(2000, 4000), budget_mb: int = 32, steps: int = 30,
        rss_workers: int = 2, base: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        t0 = time.perf_counter()
        folders = {n: make_folder(Path(tmp) / f"f{n}", n) for n in sorted({n_images, *rss_images})}
        res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "make_folders_s": time.perf_counter() - t0,
               "throughput": run_throughput(folders[n_images], workers),
               "memory": [run_rss(folders[n], budget_mb, steps, rss_workers) for n in rss_images]}
    return res


def report(res: dict) -> str:
    t = res["throughput"]
    lines = [f"machine: {res['machine']}, torch {res['torch']}",
             f"throughput: train split of {t['train_images']} JPEGs (200-320 px) -> resize {RESIZE}, "
             f"crop {IMAGE_SIZE}, pad-crop {PAD} + flip, batch {t['batch']}",
             "  num_workers | kdprune stream img/s | torchvision ImageFolder + DataLoader img/s"]
    for w in t["stream_img_s"]:
        lines.append(f"  {w:>11} | {t['stream_img_s'][w]:>20,.0f} | {t['plain_img_s'][w]:>10,.0f}")
    lines.append(f"  best: stream {t['stream_best'][1]:,.0f} img/s (workers {t['stream_best'][0]}) vs plain "
                 f"{t['plain_best'][1]:,.0f} img/s (workers {t['plain_best'][0]}): ratio {t['ratio']:.2f}x")
    lines.append("memory: streaming path training (small CNN), data.loader auto")
    for m in res["memory"]:
        lines.append(f"  {m['images']} images, decoded {m['decoded_mb']:,.0f} MiB > budget {m['budget_mb']} MiB -> "
                     f"{m['loader']}; {m['steps']} steps in {m['seconds']:.1f} s, {m['workers']} workers: RSS before "
                     f"the first batch {m['rss_before_mb']:,.0f} MiB, peak RSS main {m['vmhwm_main_mb']:,.0f} MiB, "
                     f"main + workers {m['peak_rss_sum_mb']:,.0f} MiB (PSS {m['peak_pss_sum_mb']:,.0f} MiB)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="images of the throughput folder")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--rss-images", type=int, nargs="+", default=[2000, 4000], help="folder sizes for the memory runs")
    ap.add_argument("--budget", type=int, default=32, help="data.memory_budget_mb of the memory runs")
    ap.add_argument("--steps", type=int, default=30, help="training steps of each memory run")
    ap.add_argument("--rss-workers", type=int, default=2)
    ap.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.rss_child:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - a.rss_workers))
        print(json.dumps(rss_child(a.rss_child, a.budget, a.steps, a.rss_workers)))
        return
    res = run(a.images, tuple(a.workers), tuple(a.rss_images), a.budget, a.steps, a.rss_workers)
    print(report(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
