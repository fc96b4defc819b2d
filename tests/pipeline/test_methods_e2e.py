"""The methods of issue #4 through the real pipeline: structured l1_filter pruning with all four
recovery variants and attention transfer, then gradual (AGP) magnitude pruning as a DVC experiment."""
import csv
import json

import pytest
import yaml

from kdprune import checkpoint, metrics
from tests.pipeline.test_e2e import dvc, git, make_repo, mlflow_runs


def test_l1_filter_all_variants_then_agp(tmp_path, venv_bin):
    repo, env = make_repo(tmp_path, venv_bin)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["prune"].update(method="l1_filter", ratio=0.5)
    p["distill"].update(variants=["kd", "finetune", "scratch", "scratch_kd"], at_beta=100.0)
    p["evaluate"]["latency_repeats"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    git(repo, env, "commit", "-qam", "l1_filter")

    out = dvc(repo, env, "repro")
    assert "Running stage 'distill'" in out
    for v in ("kd", "finetune", "scratch", "scratch_kd"):
        assert f"{v} epoch 1/1" in out
    ev = metrics.collect(repo)
    # physically smaller: fewer real parameters and MACs, every student has the pruned architecture
    assert ev["params_pruned"] < ev["params_teacher"] and ev["nonzero_params_pruned"] == ev["params_pruned"]
    assert 1.6 < ev["mac_reduction"] < 2.4  # half of the inner filters: about half the MACs
    for v in ("kd", "finetune", "scratch", "scratch_kd"):
        assert ev[f"params_{v}"] == ev["params_pruned"]
        assert 0 <= ev[f"acc_{v}"] <= 100
        assert ev[f"onnx_max_abs_diff_{v}"] < 1e-3
        assert (repo / "models/export" / f"{v}.kdc").stat().st_size == ev[f"bytes_compact_{v}"]
        assert (repo / "models/export" / f"{v}.onnx").exists()
        assert ev[f"bytes_compact_{v}"] < ev[f"bytes_checkpoint_{v}"]
    lat = json.loads((repo / "logs/latency.json").read_text())  # timings: outside DVC's outputs
    for name in ("teacher", "kd", "scratch"):
        assert lat[f"latency_b1_ms_{name}"] > 0 and lat[f"latency_b128_ms_{name}"] > 0
    assert "does not speed up dense kernels" in lat["note"]
    kd_meta = checkpoint.load_checkpoint(repo / "models/students/kd.pt")[2]  # the variant's settings: checkpoint meta
    assert kd_meta["at_beta"] == 100.0 and kd_meta["alpha"] == pytest.approx(0.9)
    assert checkpoint.load_checkpoint(repo / "models/students/finetune.pt")[2]["at_beta"] == 0.0
    run = mlflow_runs(repo)[0]
    assert {"acc_scratch", "acc_scratch_kd", "latency_b128_ms_kd", "bytes_compact_kd"} <= set(run.data.metrics)
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-qm", "baseline")

    out = dvc(repo, env, "exp", "run", "-S", "prune.method=magnitude", "-S", "prune.schedule=agp",
              "-S", "prune.ratio=0.9", "-S", "prune.agp_steps=3", "-S", "distill.variants=[kd,scratch]",
              "-S", "distill.epochs=2")
    assert "Running stage 'train_teacher'" not in out
    ev = metrics.collect(repo)
    assert yaml.safe_load((repo / "params.yaml").read_text())["prune"]["schedule"] == "agp"
    assert ev["prunable_compression_ratio"] == pytest.approx(10.0, rel=1e-3)
    # AGP reached exactly the one-shot target sparsity; scratch kept the one-shot mask
    assert (ev["nonzero_prunable_params_kd"] == ev["nonzero_prunable_params_scratch"]
            == ev["nonzero_prunable_params_pruned"])
    with open(repo / "plots/distill/kd.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["prunable_sparsity"]) for r in rows] == pytest.approx([0.9, 0.9], abs=1e-3)  # agp_end 0.5
    assert len(mlflow_runs(repo)) == 2
