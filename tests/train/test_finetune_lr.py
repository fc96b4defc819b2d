"""distill.finetune_lr: the finetune variant trains at its own peak learning rate, kd at distill.lr, in one run of
the real distill stage (a study runs each method at its own tuned rate without giving up the pairing)."""
import csv

import yaml

from tests.pipeline.test_faults import make_workdir, stage


def lrs(path) -> list[float]:
    with open(path) as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


def test_finetune_trains_at_its_own_rate_and_kd_at_distill_lr(tmp_path):
    work, env = make_workdir(tmp_path, n_train=500, epochs=1)
    p = yaml.safe_load((work / "params.yaml").read_text())
    p["distill"].update(epochs=2, batch_size=64, lr=0.01, finetune_lr=0.2, variants=["kd", "finetune"],
                        schedule="constant")
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for module in ("stages.prepare", "stages.train_teacher", "stages.prune", "stages.distill"):
        stage(work, env, module)
    kd, ft = lrs(work / "plots/distill/kd.csv"), lrs(work / "plots/distill/finetune.csv")
    assert kd == [0.01, 0.01] and ft == [0.2, 0.2], (kd, ft)
