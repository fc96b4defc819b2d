"""python -m kdprune.compare: one readable row per experiment from `dvc exp show --json`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdprune.experiments import compare
from tests.helpers import ROOT


def entry(rev, name, ratio, variants, accs, experiments=None):
    metrics = {"metrics/teacher.json": {"data": {"acc_teacher": 92.0, "epochs": 6}},
               "metrics/prune.json": {"data": {"acc_pruned": 30.0, "compression_ratio": 1 / (1 - ratio),
                                               "prunable_compression_ratio": 1 / (1 - ratio), "mac_reduction": 1.0,
                                               "method": "magnitude"}}}
    for v, a in accs.items():
        metrics[f"metrics/distill/{v}.json"] = {"data": {f"acc_{v}": a, "alpha": 0.9, "gradual": False}}
    params = {"seed": 0, "data": {"name": "fashion_mnist"}, "model": {"arch": "resnet", "depth": 8},
              "prune": {"method": "magnitude", "ratio": ratio, "schedule": "oneshot"},
              "distill": {"variants": variants, "epochs": 1}}
    return {"rev": rev, "name": name, "error": None,
            "data": {"rev": rev, "params": {"params.yaml": {"data": params}}, "metrics": metrics},
            "experiments": experiments}


# the shape dvc 3.67 prints: the workspace, then each commit with its experiments under "revs"
EXP_SHOW = [
    entry("workspace", None, 0.8, ["kd", "finetune"], {"kd": 91.75, "finetune": 91.8}),
    entry("3aebb93aaaa", "main", 0.8, ["kd", "finetune"], {"kd": 91.75, "finetune": 91.8}, experiments=[
        {"revs": [entry("bbbb", "wiser-goat", 0.9, ["kd", "scratch"], {"kd": 90.8, "scratch": 84.0})]},
        {"revs": [{"rev": "cccc", "name": "failed-exp", "data": None, "error": {"msg": "x"}}]},
    ]),
]


def test_one_row_per_experiment_with_the_columns_people_compare():
    rows = compare.rows_from(EXP_SHOW)
    assert [r["experiment"] for r in rows] == ["workspace", "main", "wiser-goat"]  # a failed one has no data
    out = compare.render(rows)
    header = out.splitlines()[0]
    assert header.startswith("| experiment | method | ratio | schedule | variants |")
    assert "acc_kd | acc_finetune | acc_scratch" in header  # every variant any experiment ran, in order
    assert "epochs" in header and "alpha" not in header and "gradual" not in header
    wiser = next(line for line in out.splitlines() if line.startswith("| wiser-goat"))
    assert "| 0.9 |" in wiser and "| kd+scratch |" in wiser and "| 10.00x |" in wiser and "| 90.80 |" in wiser
    assert wiser.count("| - |") == 1  # no finetune in that experiment


def test_sort_and_csv():
    rows = compare.rows_from(EXP_SHOW, sort="compression_ratio")
    assert rows[0]["experiment"] == "wiser-goat"
    lines = compare.render(rows, as_csv=True).splitlines()
    assert lines[0].split(",")[:3] == ["experiment", "method", "ratio"] and len(lines) == 4
    with pytest.raises(compare.CompareError, match="no such column"):
        compare.rows_from(EXP_SHOW, sort="acc_magic")


def test_cli_outside_a_dvc_repo_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdprune.compare"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                            "DVC_NO_ANALYTICS": "1"})
    assert r.returncode == 2 and r.stderr.startswith("error: `dvc exp show --json` failed") and "Traceback" not in r.stderr


def test_dvc_beside_the_python_is_used_when_the_venv_is_not_activated(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dvc").write_text('#!/bin/sh\necho \'[{"rev": "workspace", "name": null, "data": {}}]\'\n')
    (fake / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # no dvc on PATH
    monkeypatch.setattr(sys, "executable", str(fake / "python"))
    assert compare.exp_show_json([]) == [{"rev": "workspace", "name": None, "data": {}}]
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # and none anywhere: one line
    with pytest.raises(compare.CompareError, match="dvc not found"):
        compare.exp_show_json([])


def test_a_mac_target_shows_the_ratio_reached_and_each_row_names_its_model():
    """Old: ratio showed prune.ratio (0.8, not used with a MAC target; 0.304 was reached), and depth 8 showed for
    torchvision and custom models, with no model name anywhere."""
    target = entry("dddd", "mac-target", 0.8, ["kd"], {"kd": 90.0})
    data = target["data"]
    data["params"]["params.yaml"]["data"]["prune"].update(method="channel", target_macs_reduction=2.0)
    data["metrics"]["metrics/prune.json"]["data"].update(channel_ratio=0.30399999, reached_macs_reduction=2.01,
                                                         mac_reduction=2.01)
    tv = entry("eeee", "tv", 0.5, ["kd"], {"kd": 89.0})
    tv["data"]["params"]["params.yaml"]["data"]["model"] = {"arch": "torchvision", "name": "resnet18", "depth": 8}
    custom = entry("ffff", "mine", 0.5, ["kd"], {"kd": 88.0})
    custom["data"]["params"]["params.yaml"]["data"]["model"] = {"arch": "custom", "factory": "pkg.mod:net", "depth": 8}
    rows = compare.rows_from([EXP_SHOW[0], target, tv, custom])
    out = compare.render(rows).splitlines()
    header = out[0]
    assert header.startswith("| experiment | method | ratio | macs_target | schedule | variants | epochs | seed | "
                             "data | model | arch | depth |"), header
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in out[2:]}
    col = {c: i for i, c in enumerate(header.split(" | "))}
    assert cells["mac-target"][col["ratio"]] == "0.304" and cells["mac-target"][col["macs_target"]] == "2"
    assert cells["mac-target"][col["mac_reduction"]] == "2.01x"
    assert cells["workspace"][col["ratio"]] == "0.8" and cells["workspace"][col["macs_target"]] == "-"
    assert [cells[e][col["model"]] for e in ("workspace", "tv", "mine")] == [
        "ResNet-8", "torchvision resnet18", "custom pkg.mod:net"]
    assert [cells[e][col["depth"]] for e in ("workspace", "tv", "mine")] == ["8", "-", "-"]
    csv_rows = compare.render(rows, as_csv=True).splitlines()
    assert csv_rows[2].startswith("mac-target,channel,0.30399999,2.0,")
    # without a MAC target in any row: no macs_target column, and ratio is prune.ratio as before
    assert "macs_target" not in compare.render(compare.rows_from(EXP_SHOW)).splitlines()[0]


def test_the_int8_files_accuracy_and_bytes_are_shown_not_the_fp32_onnx_duplicates():
    e = entry("dddd", "int8-exp", 0.8, ["kd"], {"kd": 91.0})
    e["data"]["metrics"]["metrics/evaluate.json"] = {"data": {
        "acc_kd_onnx": 91.0, "acc_kd_int8": 90.87, "acc_teacher_int8": 91.9, "bytes_onnx_int8_kd": 103_780,
        "bytes_onnx_int8_gzip_kd": 33_016, "bytes_onnx_kd": 314_537}}
    rows = compare.rows_from([e])
    assert rows[0]["acc_kd_int8"] == 90.87 and rows[0]["bytes_onnx_int8_kd"] == 103_780
    assert "acc_kd_onnx" not in rows[0] and "bytes_onnx_int8_gzip_kd" not in rows[0]  # equal torch's / too many
    header = compare.render(rows).splitlines()[0]
    assert header.index("acc_kd ") < header.index("acc_kd_int8") < header.index("bytes_onnx_int8_kd")
    assert "| 90.87 |" in compare.render(rows) and "103780" in compare.render(rows)
