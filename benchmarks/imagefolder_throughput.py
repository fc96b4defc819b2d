"""Image folders: the streaming path's throughput against a plain torchvision pipeline, and its peak memory.

Measures, in one run, on a generated folder of JPEGs of 200-320 px (ImageFolder layout, ImageNet-like sizes),
in a temp directory (``--base``, default the system's), with the machine's load average before and after:
  (a) the stream path's prepare (``kdprune.data.imagefolder.prepare``, ``loader: stream``): every image decoded
      once (decode + resize + centre crop in ``--prepare-workers`` DataLoader workers) into the decoded array on
      disk (``kdprune.data.decoded``); its seconds and images/s;
  (b) images/s through kdprune's streaming loader (``kdprune.data.streaming.StreamLoader``: batches gathered from
      that array, pad-and-random-crop + flip in numpy, normalised float batches), train split, over ``--epochs``
      epochs, with its prefetch thread and without (``prefetch`` 2 and 0; no DataLoader workers), the array's
      pages warm in the page cache; and one epoch after its pages were dropped from the page cache
      (``posix_fadvise(DONTNEED)`` on the array file alone), which reads them from the disk;
  (c) images/s of a plain torchvision ``ImageFolder`` + ``DataLoader`` with the same transforms as PIL transforms
      (Resize, CenterCrop, RandomCrop(padding), RandomHorizontalFlip, ToTensor, Normalize), which decodes every
      image every epoch, at num_workers 0, 1, 2, 4, over the same epochs; the ratio compares each one's best
      warm epoch; the prepare cost and the epochs it takes to pay for itself are given beside it;
  (d) peak memory while the streaming path trains a few steps (a small CNN with a stride-4 stem, SGD, batches
      from ``kdprune.stage.train_loader``) on folders larger than ``data.memory_budget_mb``, with the budget set
      low so that ``auto`` picks streaming, for two folder sizes (the figures must not grow with the folder):
      what is counted is this process and its children (prepare's decoding workers, which exit before training):
      the peak over time of their summed RSS, PSS and anonymous RSS (RssAnon: the memory the budget bounds),
      separately while prepare decodes (with its workers) and while training reads the array, and the main
      process's VmHWM. The decoded array is read with ``pread``, not mapped, so its pages are the
      kernel's page cache and are in none of these figures (they are reclaimable; a memory map's pages would
      count in RSS as RssFile). The model is small so that the figures are those of the data path, not of
      activations; the RSS before the first batch (torch, the model, the index) is given as the baseline.

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

from kdprune.data import decoded, imagefolder, streaming  # noqa: E402

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


def _timed(loader, epochs: int = 1, skip: int = 2) -> float:
    """Images/s over ``epochs`` epochs, not counting the first ``skip`` batches (worker start-up)."""
    n, t0, k = 0, (time.perf_counter() if skip == 0 else None), 0
    for _ in range(epochs):
        for x, _ in loader:
            if k == skip - 1:
                t0 = time.perf_counter()
            elif k >= skip:
                n += len(x)
            k += 1
    return n / (time.perf_counter() - t0) if t0 is not None and n else float("nan")


def plain_loader(root: Path, workers: int, mean, std, batch: int = BATCH):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(IMAGE_SIZE),
                             transforms.RandomCrop(IMAGE_SIZE, padding=PAD), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "train"), transform=tf), batch_size=batch,
                                       shuffle=True, num_workers=workers, persistent_workers=workers > 0)


def _drop_page_cache(path: Path) -> None:
    """Evict this one file's pages from the page cache (the rest of the machine's cache is left alone)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_throughput(root: Path, workers=(0, 1, 2, 4), batch: int = BATCH, epochs: int = 3,
                   prepare_workers: int | None = None) -> dict:
    t0 = time.perf_counter()
    data = imagefolder.prepare(str(root), image_size=IMAGE_SIZE, resize_size=RESIZE, loader="stream",
                               num_workers=prepare_workers)
    prepare_s = time.perf_counter() - t0
    n_all = len(data["train_y"]) + len(data["test_y"])
    res = {"train_images": len(data["train_y"]), "batch": batch, "epochs": epochs,
           "prepare_s": prepare_s, "prepare_images": n_all, "prepare_img_s": n_all / prepare_s,
           "prepare_workers": prepare_workers if prepare_workers is not None else workers_default(),
           "stream_img_s": {}, "plain_img_s": {}}
    array = streaming.split_array(data, "train")
    res["array_mb"] = array.path.stat().st_size / 2**20

    def stream(prefetch: int):
        return streaming.StreamLoader(array, data["train_y"], data["mean"], data["std"], batch, train=True,
                                      crop_padding=PAD, hflip=True, prefetch=prefetch)

    for prefetch in (0, 2):
        res["stream_img_s"][f"prefetch {prefetch}"] = _timed(stream(prefetch), epochs)
    _drop_page_cache(array.path)
    res["stream_cold_img_s"] = _timed(stream(2), 1, skip=0)  # its pages read from the disk
    for w in workers:
        res["plain_img_s"][w] = _timed(plain_loader(root, w, data["mean"], data["std"], batch), epochs)
    res["stream_best"] = max(res["stream_img_s"].items(), key=lambda kv: kv[1])
    res["plain_best"] = max(res["plain_img_s"].items(), key=lambda kv: kv[1])
    res["ratio"] = res["stream_best"][1] / res["plain_best"][1]
    # the epochs after which prepare's one decode has paid for itself against the plain path's per-epoch decode
    per_epoch_saved = res["train_images"] / res["plain_best"][1] - res["train_images"] / res["stream_best"][1]
    res["break_even_epochs"] = prepare_s / per_epoch_saved if per_epoch_saved > 0 else float("inf")
    return res


def workers_default() -> int:
    from kdprune.data.workers import default_workers

    return default_workers()


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
    """Samples the summed RSS, PSS and RssAnon of this process and its children every ``period`` s; keeps the
    peaks."""

    def __init__(self, period: float = 0.05):
        super().__init__(daemon=True)
        self.period, self.stop, self.lock = period, threading.Event(), threading.Lock()
        self.peak_rss_kb = self.peak_pss_kb = self.peak_anon_kb = 0

    def sample(self) -> None:
        me = os.getpid()
        pids = [me, *_children(me)]
        rss = sum(_proc_kb(p, "VmRSS") for p in pids)
        pss = sum(_proc_kb(p, "Pss", "smaps_rollup") for p in pids)
        anon = sum(_proc_kb(p, "RssAnon") for p in pids)
        with self.lock:
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_anon_kb = max(self.peak_anon_kb, anon)

    def run(self):
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.period)

    def take(self) -> dict:
        """The peaks so far (one more sample first), in MiB; they start again from a sample of now (one phase
        ends, the next begins)."""
        self.sample()
        with self.lock:
            peaks = {"rss_sum_mb": self.peak_rss_kb / 1024, "pss_sum_mb": self.peak_pss_kb / 1024,
                     "anon_sum_mb": self.peak_anon_kb / 1024}
            self.peak_rss_kb = self.peak_pss_kb = self.peak_anon_kb = 0
        self.sample()
        return peaks


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
    prepare_peaks = monitor.take()  # prepare's decoding workers have exited: the training phase starts here
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
            "prepare_peaks": prepare_peaks, "train_peaks": monitor.take(),
            "rss_file_main_mb": _proc_kb(os.getpid(), "RssFile") / 1024}


def run_rss(root: Path, budget_mb: int, steps: int, workers: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--rss-child", str(root), "--budget", str(budget_mb),
                        "--steps", str(steps), "--rss-workers", str(workers)],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError(f"memory run failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run(n_images: int = 2000, workers=(0, 1, 2, 4), rss_images=(2000, 4000), budget_mb: int = 32, steps: int = 30,
        rss_workers: int = 2, base: Path | None = None, epochs: int = 3, prepare_workers: int | None = None) -> dict:
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        os.environ[decoded.ENV_DIR] = str(Path(tmp) / "decoded")  # the arrays go with the folders (and children)
        load_before = _load()
        t0 = time.perf_counter()
        folders = {n: make_folder(Path(tmp) / f"f{n}", n) for n in sorted({n_images, *rss_images})}
        res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "where": tmp, "load_before": load_before,
               "make_folders_s": time.perf_counter() - t0,
               "throughput": run_throughput(folders[n_images], workers, epochs=epochs, prepare_workers=prepare_workers),
               "memory": [run_rss(folders[n], budget_mb, steps, rss_workers) for n in rss_images],
               "load_after": _load()}
    return res


def report(res: dict) -> str:
    t = res["throughput"]
    lines = [f"machine: {res['machine']}, torch {res['torch']}; load average (1, 5, 15 min) before "
             f"{res.get('load_before')}, after {res.get('load_after')}; folders in {res.get('where')}",
             f"throughput: train split of {t['train_images']} JPEGs (200-320 px) -> resize {RESIZE}, "
             f"crop {IMAGE_SIZE}, pad-crop {PAD} + flip, batch {t['batch']}, {t['epochs']} epochs each",
             f"  stream prepare (decode once, {t['prepare_workers']} workers): {t['prepare_images']} images in "
             f"{t['prepare_s']:.1f} s = {t['prepare_img_s']:,.0f} img/s -> a {t['array_mb']:,.1f} MiB array (train)",
             "  kdprune stream (decoded array, no workers) img/s:"]
    for k, v in t["stream_img_s"].items():
        lines.append(f"    {k:>10} | {v:>10,.0f}")
    lines.append(f"    page cache dropped, first epoch | {t['stream_cold_img_s']:>10,.0f}")
    lines.append("  torchvision ImageFolder + DataLoader (decodes every epoch) img/s:")
    for w, v in t["plain_img_s"].items():
        lines.append(f"    workers {w:>2} | {v:>10,.0f}")
    lines.append(f"  best: stream {t['stream_best'][1]:,.0f} img/s ({t['stream_best'][0]}) vs plain "
                 f"{t['plain_best'][1]:,.0f} img/s (workers {t['plain_best'][0]}): ratio {t['ratio']:.2f}x per epoch; "
                 f"prepare's decode pays for itself after {t['break_even_epochs']:.2f} epochs")
    lines.append("memory: streaming path training (small CNN), data.loader auto; counted: this process and its "
                 "children (RSS, PSS, RssAnon summed); the decoded array is read with pread, so its pages are the "
                 "kernel's page cache, in none of these")
    for m in res["memory"]:
        tr, pr = m["train_peaks"], m["prepare_peaks"]
        lines.append(f"  {m['images']} images, decoded {m['decoded_mb']:,.0f} MiB > budget {m['budget_mb']} MiB -> "
                     f"{m['loader']}; {m['steps']} steps in {m['seconds']:.1f} s: RSS before the first batch "
                     f"{m['rss_before_mb']:,.0f} MiB; training peaks: RSS {tr['rss_sum_mb']:,.0f} MiB, PSS "
                     f"{tr['pss_sum_mb']:,.0f} MiB, anonymous {tr['anon_sum_mb']:,.0f} MiB; prepare ({m['workers']} "
                     f"workers, summed: shared pages count once per process in RSS and anonymous) RSS "
                     f"{pr['rss_sum_mb']:,.0f}, PSS {pr['pss_sum_mb']:,.0f}, anonymous {pr['anon_sum_mb']:,.0f} MiB; "
                     f"peak RSS main {m['vmhwm_main_mb']:,.0f} MiB, its RssFile at the end (libraries; no array "
                     f"pages) {m['rss_file_main_mb']:,.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="images of the throughput folder")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--rss-images", type=int, nargs="+", default=[2000, 4000], help="folder sizes for the memory runs")
    ap.add_argument("--budget", type=int, default=32, help="data.memory_budget_mb of the memory runs")
    ap.add_argument("--steps", type=int, default=30, help="training steps of each memory run")
    ap.add_argument("--rss-workers", type=int, default=2, help="prepare's decoding workers in the memory runs")
    ap.add_argument("--epochs", type=int, default=3, help="epochs timed per loader")
    ap.add_argument("--prepare-workers", type=int, default=None, help="decoding workers of the throughput prepare "
                    "(default: min(8, cores))")
    ap.add_argument("--base", type=Path, default=None, help="where the temp folders and arrays go")
    ap.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.rss_child:
        torch.set_num_threads(os.cpu_count() or 1)  # training runs no workers (prepare's have exited)
        print(json.dumps(rss_child(a.rss_child, a.budget, a.steps, a.rss_workers)))
        return
    res = run(a.images, tuple(a.workers), tuple(a.rss_images), a.budget, a.steps, a.rss_workers, a.base, a.epochs,
              a.prepare_workers)
    print(report(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
