"""Injected faults on real stage processes: SIGKILL mid-training (resume), SIGKILL halfway through
an output write (atomic outputs), a teacher from another dataset. Stages run as subprocesses in a
temp workdir on tiny format-true data, exactly as DVC would run them."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdprune import checkpoint, io
from kdprune.models import build_model, resnet_spec
from tests.helpers import default_params, write_fake_dataset

ROOT = Path(__file__).resolve().parents[2]


def make_workdir(tmp_path: Path, n_train=2000, epochs=5, **teacher) -> tuple[Path, dict]:
    work = tmp_path / "work"
    work.mkdir()
    raw = write_fake_dataset(tmp_path / "raw", n_train=n_train, n_test=100)
    p = default_params()
    p["data"].update(root=str(raw), download=False)
    p["model"].update(depth=8, width=8)
    p["runtime"].update(threads=1)
    p["teacher"].update(epochs=epochs, batch_size=64, checkpoint_every=1, **teacher)
    p["mlflow"]["enabled"] = False
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(ROOT), CI="true", OMP_NUM_THREADS="1")
    return work, env


def stage(work, env, module, *args, check=True, hook=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", *(["tests.killhook", *map(str, hook)] if hook else []), module, *args]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"{module} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_sigkill_during_teacher_training_resumes(tmp_path):
    work, env = make_workdir(tmp_path)
    stage(work, env, "stages.prepare")
    ckpt = work / "checkpoints" / "teacher.pt"
    proc = subprocess.Popen([sys.executable, "-m", "stages.train_teacher"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while not ckpt.exists():
        assert proc.poll() is None, f"teacher ended before its first checkpoint:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    first_out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert "teacher epoch 5/5" not in first_out  # the kill landed mid-run
    assert not (work / "models" / "teacher.pt").exists() and not (work / "metrics" / "teacher.json").exists()
    killed_at = io.torch_load(ckpt)["epoch"]
    assert 1 <= killed_at < 5

    r = stage(work, env, "stages.train_teacher")
    line = next(x for x in r.stdout.splitlines() if "resuming from checkpoints/teacher.pt" in x)
    start = int(line.split("at epoch ")[1].split("/")[0])
    assert start >= killed_at > 0, line  # resumed, not started over
    assert f"teacher epoch {start}/5" not in r.stdout and "teacher epoch 5/5" in r.stdout
    model, _, meta = checkpoint.load_checkpoint(work / "models" / "teacher.pt", expect_classes=10)
    assert meta["dataset"] == "fashion_mnist" and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    metrics = json.loads((work / "metrics" / "teacher.json").read_text())
    assert set(metrics) == {"acc_teacher", "macs_teacher", "params_teacher"} and 0 <= metrics["acc_teacher"] <= 100
    curve = (work / "plots" / "teacher.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in curve[1:]] == ["1", "2", "3", "4", "5"]  # the whole curve survived
    assert not ckpt.exists()  # deleted once the outputs were written


def test_sigkill_halfway_through_writes_leaves_no_torn_file(tmp_path):
    work, env = make_workdir(tmp_path, n_train=300, epochs=2)

    # prepare: the first write of the prepared dataset dies halfway -> no dataset file at all
    r = stage(work, env, "stages.prepare", check=False, hook=("dataset.pt", 1))
    assert r.returncode == -signal.SIGKILL and "killhook" in r.stdout
    prepared = work / "data" / "prepared" / "dataset.pt"
    assert not prepared.exists()
    stage(work, env, "stages.prepare")
    stage(work, env, "stages.train_teacher")
    good = {p: (work / p).read_bytes() for p in ("models/teacher.pt", "metrics/teacher.json")}

    # a rerun (e.g. with new params) killed while rewriting each output: the old output is intact
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["teacher"]["lr"] = 0.1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for target in good:  # teacher.pt is written first, then teacher.json
        r = stage(work, env, "stages.train_teacher", check=False, hook=(Path(target).name, 1))
        assert r.returncode == -signal.SIGKILL and "killhook" in r.stdout, r.stdout + r.stderr
        assert (work / target).read_bytes() == good[target], f"{target} changed by a write that was killed"
        checkpoint.load_checkpoint(work / "models" / "teacher.pt")  # old, or the complete new one
        json.loads((work / "metrics" / "teacher.json").read_text())

    # killed while writing the resume checkpoint of epoch 2: the epoch-1 checkpoint is intact and used
    (work / "checkpoints" / "teacher.pt").unlink(missing_ok=True)
    r = stage(work, env, "stages.train_teacher", check=False, hook=("checkpoints", 2))
    assert r.returncode == -signal.SIGKILL
    assert io.torch_load(work / "checkpoints" / "teacher.pt")["epoch"] == 1
    leftovers = sorted(p.name for p in work.rglob(".*.tmp"))
    assert leftovers  # SIGKILL leaves the temp files of the torn writes behind ...
    r = stage(work, env, "stages.train_teacher")
    assert "resuming from checkpoints/teacher.pt at epoch 1/2" in r.stdout
    assert checkpoint.load_checkpoint(work / "models" / "teacher.pt")[2]["dataset"] == "fashion_mnist"
    assert sorted(p.name for p in work.rglob(".*.tmp")) == []  # ... and the next write of each output removes them


def test_teacher_from_another_dataset_is_refused_by_the_stage(tmp_path):
    work, env = make_workdir(tmp_path, n_train=100)
    stage(work, env, "stages.prepare")
    other = build_model(resnet_spec(8, 8, 1, 100))  # e.g. a CIFAR-100 teacher
    checkpoint.save_checkpoint(work / "models" / "teacher.pt", other, meta={"dataset": "cifar100"})
    r = stage(work, env, "stages.prune", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "100 output classes but the dataset has 10" in r.stderr and "cifar100" in r.stderr
    assert not (work / "models" / "pruned.pt").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_prepared_dataset_is_a_clear_stage_error(tmp_path, damage):
    work, env = make_workdir(tmp_path, n_train=100)
    stage(work, env, "stages.prepare")
    prepared = work / "data" / "prepared" / "dataset.pt"
    data = prepared.read_bytes()
    prepared.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"not a torch file at all")
    r = stage(work, env, "stages.train_teacher", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data/prepared/dataset.pt" in r.stderr and "dvc repro prepare" in r.stderr


def test_sigkill_during_distill_resumes_with_the_mask(tmp_path):
    """The one distill stage runs kd, then finetune. Killed during finetune, the rerun does not train kd again
    (its finished resume state is kept until the stage ends) and resumes finetune with the mask."""
    work, env = make_workdir(tmp_path, n_train=300, epochs=1)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["distill"].update(epochs=3, batch_size=64, checkpoint_every=1, variants=["kd", "finetune"])
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for module in ("stages.prepare", "stages.train_teacher", "stages.prune"):
        stage(work, env, module)
    # killed halfway through writing finetune's epoch-2 resume checkpoint
    r = stage(work, env, "stages.distill", check=False, hook=("distill_finetune.pt", 2))
    assert r.returncode == -signal.SIGKILL and "killhook" in r.stdout, r.stdout + r.stderr
    assert "kd epoch 3/3" in r.stdout
    ckpt = work / "checkpoints" / "distill_finetune.pt"
    assert io.torch_load(ckpt)["epoch"] == 1 and io.torch_load(ckpt)["masks"]
    assert io.torch_load(work / "checkpoints" / "distill_kd.pt")["epoch"] == 3  # kept until the stage ends
    assert not (work / "models" / "students" / "finetune.pt").exists()
    kd_before = (work / "models" / "students" / "kd.pt").read_bytes()

    r = stage(work, env, "stages.distill")
    assert "kd: resuming from checkpoints/distill_kd.pt at epoch 3/3" in r.stdout and "kd epoch" not in r.stdout
    assert "finetune: resuming from checkpoints/distill_finetune.pt at epoch 1/3" in r.stdout
    assert "finetune epoch 1/3" not in r.stdout and "finetune epoch 3/3" in r.stdout
    assert (work / "models" / "students" / "kd.pt").read_bytes() == kd_before  # same weights, same bytes
    pruned, pruned_masks, _ = checkpoint.load_checkpoint(work / "models" / "pruned.pt")
    for variant in ("kd", "finetune"):
        student, masks, meta = checkpoint.load_checkpoint(work / "models" / "students" / f"{variant}.pt", expect_classes=10)
        assert meta["variant"] == variant and masks.keys() == pruned_masks.keys()
        for name, p in student.named_parameters():  # the mask survived the kill and the resume
            if name in masks:
                assert not p.detach()[~masks[name]].any()
        m = json.loads((work / "metrics" / "distill" / f"{variant}.json").read_text())
        assert set(m) == {f"acc_{variant}", f"train_acc_{variant}"}  # test, and a fixed training subset to select on
        assert 0 <= m[f"acc_{variant}"] <= 100 and 0 <= m[f"train_acc_{variant}"] <= 100
    assert not list((work / "checkpoints").glob("distill_*.pt"))  # removed once every output is written


def test_teacher_of_another_architecture_is_refused_by_every_stage_that_loads_it(tmp_path):
    work, env = make_workdir(tmp_path, n_train=100)  # model: resnet depth 8 width 8
    stage(work, env, "stages.prepare")
    meta = {"dataset": "fashion_mnist", "input_shape": [1, 28, 28]}
    checkpoint.save_checkpoint(work / "models" / "teacher.pt", build_model(resnet_spec(14, 8, 1, 10)), meta=meta)
    checkpoint.save_checkpoint(work / "models" / "pruned.pt", build_model(resnet_spec(8, 8, 1, 10)), meta=meta)
    for module, *args in (("stages.prune",), ("stages.distill",), ("stages.evaluate",)):
        r = stage(work, env, module, *args, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, module + r.stderr
        assert ("models/teacher.pt was trained as resnet depth 14 width 8, but model.depth is 8 (the file has 14); "
                "run `dvc repro`") in r.stderr, module + r.stderr
    assert not (work / "models" / "students").exists() and not (work / "metrics" / "evaluate.json").exists()
