"""Smoke test: the benchmark code runs on a tiny size so it cannot rot. Speed is never asserted."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kdprune.data import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_benchmark_runs_tiny(fake_root):
    bench = load_bench()
    data = prepare_dataset("fashion_mnist", str(fake_root), False, 0, 0, seed=0)
    res = bench.run(n_images=300, workers=(0,), data=data, peak_sizes=(128,))
    for key in ("a_ours_img_s", "b_naive_img_s", "b_datapath_img_s", "fp32_peak_gflops", "c_achieved_gflops"):
        assert res[key] > 0, key
    # a ResNet-8 training step is ~3x the forward FLOPs; the forward is ~9.3 MMAC = 18.7 MFLOP at 28x28
    assert 40e6 < res["train_flops_per_image"] < 80e6
    text = bench.report(res)
    assert "a/b (vs naive pipeline)" in text and "% of fp32 peak" in text


def test_profile_script_runs_tiny(fake_root):
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = prepare_dataset("fashion_mnist", str(fake_root), False, 0, 0, seed=0)
    table = mod.profile_steps(steps=1, kd=True, data=data, row_limit=500)
    assert "aten::" in mod.profile_steps(steps=1, kd=False, data=data)
    assert "teacher_forward" in table and "mask_upkeep" in table and "augment_batch" in table


def test_compression_benchmark_runs_tiny():
    spec = importlib.util.spec_from_file_location("compression", ROOT / "benchmarks" / "compression.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(repeats=1, cases=[("tiny", 8, 4, (1, 16, 16))])
    case = res["cases"]["tiny"]
    assert 1.5 < case["structured"]["mac_reduction"] < 2.5
    assert case["structured"]["eager_b128"]["teacher_ms"] > 0
    assert case["compact_90"]["bytes_compact"] < case["compact_90"]["bytes_dense_checkpoint"]
    assert "x MAC reduction" in mod.report(res)


def test_preset_timing_runs_tiny_on_cpu():
    spec = importlib.util.spec_from_file_location("preset_timing", ROOT / "benchmarks" / "preset_timing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run("cifar10-resnet20", steps=1, warmup=1)
    assert res["device"] == "cpu" and 0.2 < res["params_millions"] < 0.3
    assert res["teacher_img_s"] > 0 and res["kd_img_s"] > 0
    # projection = epochs x 50,000 CIFAR-10 images / measured speed
    assert res["projected_hours"]["teacher"] == pytest.approx(30 * 50000 / res["teacher_img_s"] / 3600)


def test_imagefolder_benchmark_runs_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("imagefolder_throughput",
                                                  ROOT / "benchmarks" / "imagefolder_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = mod.make_folder(tmp_path / "folder", 60)  # 48 train images: 3 batches of 16
    res = mod.run_throughput(root, workers=(0,), batch=16, epochs=2, prepare_workers=0)
    assert res["stream_img_s"]["prefetch 0"] > 0 and res["stream_img_s"]["prefetch 2"] > 0
    assert res["plain_img_s"][0] > 0 and res["stream_cold_img_s"] > 0 and res["prepare_img_s"] > 0
    mem = mod.rss_child(root, budget_mb=1, steps=2, workers=0, batch=16)
    assert mem["loader"] == "stream" and mem["decoded_mb"] > mem["budget_mb"] and mem["vmhwm_main_mb"] > 0
    assert mem["train_peaks"]["anon_sum_mb"] > 0 and mem["prepare_peaks"]["pss_sum_mb"] > 0
    text = mod.report({"machine": "x", "torch": "y", "throughput": res, "memory": [mem]})
    assert "ratio" in text and "-> stream" in text and "page cache" in text and "pays for itself" in text


def test_channel_speedup_benchmark_runs_tiny():
    spec = importlib.util.spec_from_file_location("channel_speedup", ROOT / "benchmarks" / "channel_speedup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(models=["mobilenet_v3_small"], side=32, target=1.5, batches=(1, 2), repeats=1, classes=10)
    rec = res["models"]["mobilenet_v3_small"]
    assert rec["mac_reduction"] >= 1.5 and rec["params_pruned"] < rec["params_dense"]
    assert rec["b1_dense_ms"] > 0 and rec["b2_speedup"] > 0
    assert "| mobilenet_v3_small |" in mod.report(res, (1, 2))


def test_cuda_check_runs_the_real_stages_tiny_on_cpu(fake_root, tmp_path, monkeypatch):
    """benchmarks/cuda_check.py is meant for a GPU machine; its --device cpu dry run checks the same things here."""
    spec = importlib.util.spec_from_file_location("cuda_check", ROOT / "benchmarks" / "cuda_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "check.json"
    assert mod.main(["--data", str(fake_root), "--device", "cpu", "--no-bf16", "--min-teacher-acc", "0",
                     "--skip-ddp", "--repeat-teacher", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert "failed" not in record, record.get("failed")
    pipe = record["pipeline"]
    assert set(pipe["stage_seconds"]) == {"prepare", "train_teacher", "prune", "distill", "evaluate"}
    assert pipe["device_lines"] and all(line.startswith("device: cpu") for line in pipe["device_lines"])
    assert pipe["nonzero_prunable"]["kd"] == pipe["nonzero_prunable"]["finetune"] > 0
    assert pipe["teacher_repeat"]["bit_identical"]  # on the CPU the same params give the same teacher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU check on a machine without one
    assert mod.main(["--data", str(fake_root)]) == 2


@pytest.mark.slow  # 45 s: resnet18 exported and quantized twice
def test_int8_benchmark_runs_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("int8_deploy", ROOT / "benchmarks" / "int8_deploy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--resnet18", "--side", "32", "--target", "1.5", "--rounds", "1", "--repeats", "1",
                     "--json", str(tmp_path / "r.json")]) == 0
    rec = json.loads((tmp_path / "r.json").read_text())["resnet18"]
    assert rec["mac_reduction"] >= 1.5
    assert rec["models"]["pruned"]["bytes_int8"] < 0.35 * rec["models"]["pruned"]["bytes_fp32"]
    assert rec["latency"]["pruned_int8_b1_ms"] > 0
