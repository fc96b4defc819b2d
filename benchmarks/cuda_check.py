"""The real stages on a CUDA GPU: the default pipeline, then the NCCL path under torchrun (run where a GPU is).

The test suite runs on CPU machines, where the CUDA code paths (tensor-resident data on the GPU, bf16 autocast
on CUDA, NCCL process groups, DDP with ``device_ids``) cannot run. This script runs them for real:

1. the default pipeline's stages (prepare, train_teacher, prune, distill, evaluate) as ``python -m stages.X``
   in a scratch copy of the repository, with params.yaml as committed except ``runtime.device: cuda``,
   ``runtime.bf16`` (``--bf16``, default on) and MLflow off; it checks that each stage logs the CUDA device,
   that every accuracy is finite, that the teacher reaches ``--min-teacher-acc``, that every student keeps the
   pruned weights exactly zero and has the pruned model's non-zero count, and that the ONNX export agrees;
2. ``train_teacher`` and ``distill`` (kd with attention transfer, so the student's features pass through DDP)
   under ``torchrun --standalone --nproc_per_node=1``: the NCCL process group and DDP on ``cuda:0``,
   for one epoch on a train subset; it checks the log names the nccl backend and that the outputs exist.
3. with ``--repeat-teacher``, the teacher stage a second time: its weights must be bit-identical on the CPU;
   on CUDA the difference is reported.

It prints one JSON record (stage wall times, accuracies, the CPU figures committed in metrics/ for comparison)
and writes it to ``--json``. Exit status 1 when a check fails.

  python benchmarks/cuda_check.py --data /usr/share/datasets/fashion-mnist --json cuda_check.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdprune import checkpoint, io, stage  # noqa: E402
from kdprune.prune.counts import count_prunable  # noqa: E402

PIPELINE = ("stages.prepare", "stages.train_teacher", "stages.prune", "stages.distill", "stages.evaluate")
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


class CheckFailed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def scratch_repo(path: Path, data: Path, device: str, bf16: bool, edit=None) -> Path:
    """A copy of the code and params.yaml in ``path``, set to train on ``device`` from ``data``, MLflow off."""
    path.mkdir(parents=True)
    for item in ("kdprune", "stages"):
        shutil.copytree(ROOT / item, path / item, ignore=shutil.ignore_patterns("__pycache__"))
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(root=str(data), download=False)
    p["runtime"].update(device=device, bf16=bf16)
    p["mlflow"]["enabled"] = False
    if edit is not None:
        edit(p)
    (path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def run(repo: Path, *cmd: str, timeout: int = 600) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith(("DVC_", "MLFLOW_"))}
    start = time.perf_counter()
    r = subprocess.run([sys.executable, *cmd], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr, seconds


def metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / f"{name}.json").read_text())


def student_checks(repo: Path, variants: list[str]) -> dict:
    pruned, masks, _ = checkpoint.load_checkpoint(repo / stage.PRUNED)
    kept = count_prunable(pruned)[1]
    out = {}
    for v in variants:
        student = checkpoint.load_checkpoint(repo / stage.student_path(v))[0]
        weights = dict(student.named_parameters())
        check(all(not weights[n][~m].any() for n, m in masks.items()), f"{v}: a pruned weight became non-zero")
        check(count_prunable(student)[1] == kept, f"{v}: {count_prunable(student)[1]} non-zero weights, not {kept}")
        out[v] = kept
    return out


def default_pipeline(work: Path, data: Path, device: str, bf16: bool, min_teacher_acc: float, subset: int,
                     repeat_teacher: bool) -> dict:
    def edit(p):
        p["data"]["train_subset"] = subset
    repo = scratch_repo(work / "pipeline", data, device, bf16, edit)
    seconds, logs = {}, {}
    for module in PIPELINE:
        logs[module], seconds[module] = run(repo, "-m", module)
    # stage.log prefixes "[HH:MM:SS] "
    device_lines = sorted({line.split("] ", 1)[-1].strip() for text in logs.values() for line in text.splitlines()
                           if "] device: " in line})
    check(bool(device_lines) and all(line.startswith(f"device: {device}") for line in device_lines),
          f"the training stages did not log the {device} device: {device_lines}")
    teacher, pruned = metrics(repo, "teacher"), metrics(repo, "prune")
    variants = yaml.safe_load((repo / "params.yaml").read_text())["distill"]["variants"]
    students = {v: metrics(repo, f"distill/{v}") for v in variants}
    accs = {"acc_teacher": teacher["acc_teacher"], "acc_pruned": pruned["acc_pruned"],
            **{k: val for m in students.values() for k, val in m.items()}}
    check(all(math.isfinite(a) for a in accs.values()), f"a non-finite accuracy: {accs}")
    check(teacher["acc_teacher"] >= min_teacher_acc,
          f"teacher {teacher['acc_teacher']} % < --min-teacher-acc {min_teacher_acc}")
    nonzero = student_checks(repo, variants)
    evaluate = metrics(repo, "evaluate")
    onnx = {k: v for k, v in evaluate.items() if k.startswith("onnx_max_abs_diff")}
    check(all(v < 1e-3 for v in onnx.values()), f"ONNX export disagrees with torch: {onnx}")
    repeat = teacher_repeat(repo) if repeat_teacher else None
    # the CPU path is bit-identical by design (tests/train/test_determinism.py); CUDA's is what this measures
    check(repeat is None or repeat["bit_identical"] or device == "cuda",
          f"the teacher trained twice on {device} with the same params differs: {repeat}")
    cpu = {}
    for name in ("teacher", "prune", *(f"distill/{v}" for v in variants)):
        path = ROOT / "metrics" / f"{name}.json"
        if path.exists():
            cpu.update({k: v for k, v in json.loads(path.read_text()).items() if k.startswith(("acc_", "train_acc"))})
    return {"stage_seconds": {m.split(".")[1]: round(s, 1) for m, s in seconds.items()},
            "total_seconds": round(sum(seconds.values()), 1), "device_lines": device_lines,
            "accuracy": accs, "accuracy_committed_cpu": cpu, "nonzero_prunable": nonzero, "onnx": onnx,
            "teacher_repeat": repeat}


def teacher_repeat(repo: Path) -> dict:
    """Train the teacher again with the same params: are the weights bit-identical on this device?"""
    first = repo / "teacher_first.pt"
    shutil.move(repo / stage.TEACHER, first)
    run(repo, "-m", "stages.train_teacher")
    a, b = (io.torch_load(p)["state_dict"] for p in (first, repo / stage.TEACHER))
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    return {"bit_identical": all(torch.equal(a[k], b[k]) for k in a), "max_abs_weight_diff": diff,
            "acc_teacher_again": metrics(repo, "teacher")["acc_teacher"]}


def ddp_path(work: Path, data: Path, device: str, bf16: bool) -> dict:
    def edit(p):
        p["data"]["train_subset"] = 6000
        p["teacher"]["epochs"] = 1
        p["distill"].update(epochs=1, variants=["kd"], at_beta=100.0)
    repo = scratch_repo(work / "ddp", data, device, bf16, edit)
    run(repo, "-m", "stages.prepare")
    backend = "nccl" if device == "cuda" else "gloo"
    out = {}
    for module in ("stages.train_teacher", "stages.prune", "stages.distill"):
        cmd = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", module]
               if module != "stages.prune" else ["-m", module])
        text, seconds = run(repo, *cmd)
        out[module.split(".")[1]] = round(seconds, 1)
        if module != "stages.prune":
            check(f"backend {backend}" in text and f"device {device}" in text,
                  f"{module} under torchrun did not join a {backend} group on {device}:\n{text[-2000:]}")
    student_checks(repo, ["kd"])
    acc = metrics(repo, "distill/kd")["acc_kd"]
    check(math.isfinite(acc), f"kd under torchrun: accuracy {acc}")
    return {"backend": backend, "stage_seconds": out, "acc_kd": acc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="directory of the Fashion-MNIST IDX files")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--min-teacher-acc", type=float, default=85.0)
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--repeat-teacher", action="store_true",
                    help="train the teacher a second time and report whether the weights are bit-identical")
    ap.add_argument("--subset", type=int, default=0, help="data.train_subset of the pipeline run (0: every image)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a dry run of this script on a machine without a GPU (gloo instead of NCCL)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.data = args.data.resolve()  # the stages run in a scratch copy: a relative path would point there
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_check: torch sees no CUDA GPU here; nothing to check", file=sys.stderr)
        return 2
    record = {"device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "bf16": args.bf16, "train_subset": args.subset}
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            record["pipeline"] = default_pipeline(Path(tmp), args.data, args.device, args.bf16,
                                                  args.min_teacher_acc, args.subset, args.repeat_teacher)
            if not args.skip_ddp:
                record["torchrun"] = ddp_path(Path(tmp), args.data, args.device, args.bf16)
        except CheckFailed as e:
            record["failed"] = str(e)
            status = 1
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
