"""Compress your own model, end to end through DVC: an image folder of real Fashion-MNIST PNGs, a torchvision
model whose weights a plain PyTorch script saved, `dvc exp run` with channel pruning and KD + fine-tuning."""
import subprocess
import sys
from pathlib import Path

import yaml

from kdprune import metrics
from tests.pipeline.test_e2e import dvc, git, make_repo, mlflow_runs
from tests.data.test_imagefolder import FASHION_CLASSES, fashion_images

PLAIN_SCRIPT = """
import sys, torch, torchvision
torch.manual_seed(0)
model = torchvision.models.mobilenet_v3_small(num_classes=3)
torch.save(model.state_dict(), sys.argv[1])
"""


def write_folder(root: Path, per_class=(30, 10)) -> Path:
    import numpy as np
    from PIL import Image

    x, y = fashion_images()
    for (split, n), lo in zip(zip(("train", "val"), per_class), (0, 5000)):
        for digit, name in FASHION_CLASSES.items():
            d = root / split / name
            d.mkdir(parents=True)
            for k, i in enumerate(np.nonzero(y[lo:] == digit)[0][:n] + lo):
                Image.fromarray(x[i]).save(d / f"{k:03d}.png")
    return root


def test_torchvision_model_imported_teacher_image_folder_channel_pruning(tmp_path, venv_bin):
    repo, env = make_repo(tmp_path, venv_bin)
    folder = write_folder(tmp_path / "images")
    # the user's teacher: what a plain script writes, with nothing of kdprune imported
    r = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT, str(repo / "teachers" / "mnv3.pt")],
                       capture_output=True, text=True, env={**env, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["evaluate"]["latency_repeats"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-qm", "teacher and params")
    out = dvc(repo, env, "exp", "run", "-n", "byo",
              "-S", "model.arch=torchvision", "-S", "model.name=mobilenet_v3_small",
              "-S", "teacher.init=checkpoint", "-S", "teacher.checkpoint=teachers/mnv3.pt", "-S", "teacher.epochs=0",
              "-S", "data.name=imagefolder", "-S", f"data.root={folder}", "-S", "data.image_size=32",
              "-S", "data.train_subset=0", "-S", "data.test_subset=0",
              "-S", "prune.method=channel", "-S", "prune.target_macs_reduction=1.5",
              "-S", "distill.variants=[kd,finetune]", "-S", "distill.epochs=1", "-S", "distill.batch_size=30")
    assert "Running stage 'distill'" in out
    m = metrics.collect(repo)
    assert m["reached_macs_reduction"] >= 1.5 and m["params_kd"] < m["params_teacher"]  # physically smaller
    for v in ("kd", "finetune"):
        assert 0 <= m[f"acc_{v}"] <= 100 and m[f"onnx_max_abs_diff_{v}"] < 1e-3
        assert (repo / "models" / "export" / f"{v}.kdc").exists()
    (run,) = mlflow_runs(repo)
    assert run.data.params["model.name"] == "mobilenet_v3_small" and run.data.params["model.arch"] == "torchvision"
    assert run.data.params["teacher.init"] == "checkpoint"
