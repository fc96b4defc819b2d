"""Study cells whose settings an earlier cell chooses on training accuracy (presets/study-channel.yaml): the plan waits
for the choosing cell, chooses per method on train_acc_<method> only, runs the rest at the choice, and the analysis
reports the choices, PTQ against QAT, and the frontiers along MACs and INT8 bytes; hostile choices are refused."""
import dataclasses
import math

import pandas as pd
import pytest
import yaml

from kdprune import presets
from kdprune.experiments import queue as exp_queue
from kdprune.experiments import runs as exp_runs
from kdprune.experiments import frontier_axis as faxis
from kdprune.experiments import frontier_search as fsearch
from kdprune.experiments import study, study_analysis, study_plan
from tests.helpers import committed_params_text

BEST_TRAIN_LR = {"kd": 0.05, "finetune": 0.2}  # the fake's training accuracy peaks here; its test accuracy does not


@pytest.fixture
def params_path(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(committed_params_text())
    return p


def fake_row(plan, e, t: int) -> dict:
    """A finished run of ``e``: accuracy falls with the MAC reduction; training accuracy peaks at BEST_TRAIN_LR and at
    alpha 0.5, T 2 for kd (test accuracy at other values, so a test-based choice would differ); QAT adds 0.3 pt to
    INT8 accuracy, PTQ loses 0.4 pt; INT8 bytes are a quarter of fp32."""
    flat, variants = study_plan.target(plan, e)
    macs = 1 / (1 - e.ratio) ** 2
    row = {"run_id": f"r{t:04d}", "status": "FINISHED", "start_time": str(1000 * t), "end_time": str(1000 * t + 60_000)}
    row.update({f"params.{k}": str(v) for k, v in flat.items()})
    row.update(acc_teacher=93.0 + 0.1 * e.seed, acc_pruned=30.0, compression_ratio=1 / (1 - e.ratio) ** 1.8,
               prunable_compression_ratio=1 / (1 - e.ratio) ** 1.8, mac_reduction=macs,
               bytes_onnx_gzip_teacher=300_000.0)
    qat = flat["quantize.method"] == "qat"
    for v in variants:
        lr = float(flat["distill.finetune_lr"] if v == "finetune" and flat["distill.finetune_lr"] is not None
                   else flat["distill.lr"])
        acc = 93.0 - math.log(macs) ** 2 / 3 + 0.05 * e.seed + (0.4 if v == "kd" else 0.0) - 0.1 * float(
            flat["distill.epochs"] == 1)
        train_pen = abs(math.log(lr / BEST_TRAIN_LR[v])) * 0.5
        kd_pen = (abs(float(flat["distill.alpha"]) - 0.5) + abs(float(flat["distill.temperature"]) - 2)) if v == "kd" \
            else 0
        row[f"acc_{v}"] = acc - abs(math.log(lr / 0.01)) * 0.1 - 0.2 * kd_pen * -1  # test prefers lr 0.01, alpha 0.9
        row[f"train_acc_{v}"] = acc + 2 - train_pen - kd_pen
        row[f"acc_{v}_int8"] = row[f"acc_{v}"] + (0.3 if qat else -0.4)
        row[f"bytes_onnx_int8_gzip_{v}"] = 300_000.0 / (1 / (1 - e.ratio) ** 1.8) / 4
    return row


def small_plan(tmp_path, monkeypatch, params_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(params_path.read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a.db'}")
    plan = study_plan.load_plan("study-channel", tmp_path / "params.yaml")
    plan.cells = [dataclasses.replace(c, seeds=[s for s in c.seeds if s in (0, 1)]) for c in plan.cells]
    plan.frontier["seeds"] = [0, 1]
    plan.records.parent.mkdir(parents=True, exist_ok=True)
    return study_plan.resolve(plan, pd.DataFrame())


def fake_queue(monkeypatch, plan, ran: list):
    def run_grid(grid, extra, jobs, prefix, experiment, log=print):
        for seed, ratio, sets in grid:
            ran.append((prefix, seed, ratio, sets))
            over = dict(tuple(s.split("=", 1)) for s in sets)
            e = study_plan.Experiment(prefix.removeprefix("study-"), seed, ratio,
                                      tuple(sorted((k, yaml.safe_load(v)) for k, v in over.items())))
            old = exp_runs.read_records(plan.records)
            new = pd.DataFrame([fake_row(plan, e, len(old) + len(ran))]).astype(str)
            pd.concat([old.astype(str), new]).to_csv(plan.records, index=False)
        return {}, {}, {}, 0.0
    monkeypatch.setattr(exp_queue, "run_grid", run_grid)


def test_the_committed_structured_plan_validates_waits_for_its_choices_and_is_sized(params_path):
    plan = study_plan.load_plan("study-channel", params_path)
    assert [e.cell for e in plan.experiments] == ["lr"] * 9 and plan.core == "core"
    assert set(plan.pending) == {"kd_settings", "core", "epochs", "qat"}
    assert "waits for cell lr (0 of 9 experiments done)" in plan.pending["kd_settings"]
    sizes = {c.name: len(c.seeds) * len(c.ratios) * math.prod(map(len, c.grid.values())) for c in plan.cells}
    assert sizes == {"lr": 9, "kd_settings": 12, "core": 20, "epochs": 6, "qat": 6}
    core = next(c for c in plan.cells if c.name == "core")
    assert core.ratios == [0.2, 0.4, 0.55, 0.65] and core.seeds == [0, 1, 2, 3, 4]
    assert {k: (r.cell, r.by, r.key) for k, r in core.refs.items()} == {
        "distill.lr": ("lr", "kd", "distill.lr"), "distill.finetune_lr": ("lr", "finetune", "distill.lr"),
        "distill.alpha": ("kd_settings", "kd", "distill.alpha"),
        "distill.temperature": ("kd_settings", "kd", "distill.temperature")}
    assert plan.base["prune.method"] == "channel" and plan.base["teacher.epochs"] == 12
    assert plan.frontier["axes"] == ["macs", "bytes"] and plan.outputs == "study_channel"


def test_choices_are_made_per_method_on_training_accuracy_only(tmp_path, monkeypatch, params_path):
    plan = small_plan(tmp_path, monkeypatch, params_path)
    lr_cell = [e for e in plan.experiments if e.cell == "lr"]
    rows = [fake_row(plan, e, i) for i, e in enumerate(lr_cell[:-1])]
    half = study_plan.resolve(plan, pd.DataFrame(rows).astype(str))
    assert "core" in half.pending and "5 of 6 experiments done" in half.pending["kd_settings"]
    rows.append(fake_row(plan, lr_cell[-1], 99))
    runs = pd.DataFrame(rows).astype(str)
    nan = runs.copy()
    nan.loc[0, "train_acc_finetune"] = "nan"
    assert "has no train_acc_finetune" in study_plan.resolve(plan, nan).pending["core"]
    full = study_plan.resolve(plan, runs)
    assert "kd_settings" not in full.pending and "core" in full.pending  # core waits for kd_settings now
    ks = [e for e in full.experiments if e.cell == "kd_settings"]
    assert len(ks) == 8 and {e.flat["distill.lr"] for e in ks} == {0.05}  # kd's train-selected rate, not test's 0.01
    rows += [fake_row(full, e, 200 + i) for i, e in enumerate(ks)]
    done = study_plan.resolve(plan, pd.DataFrame(rows).astype(str))
    assert not done.pending
    core = [e for e in done.experiments if e.cell == "core"]
    assert {(e.flat["distill.lr"], e.flat["distill.finetune_lr"], e.flat["distill.alpha"],
             e.flat["distill.temperature"]) for e in core} == {(0.05, 0.2, 0.5, 2.0)}
    assert done.choices["qat"]["distill.finetune_lr"].score > 0 and done.choices["qat"]["distill.lr"].n == 2
    assert all(e.flat["quantize.method"] == "qat" for e in done.experiments if e.cell == "qat")


def test_the_structured_study_runs_to_the_end_and_reports_qat_and_both_frontiers(tmp_path, monkeypatch, params_path):
    plan = small_plan(tmp_path, monkeypatch, params_path)
    ran: list = []
    fake_queue(monkeypatch, plan, ran)
    monkeypatch.setattr(study, "clock", lambda: 0.0)
    assert study.run_part(plan, 10_000, 1, None, log=lambda m: None) is True
    cells = [r[0] for r in ran]
    assert cells.index("study-lr") < cells.index("study-kd_settings") < cells.index("study-core")
    assert cells.count("study-core") == 8 and "study-frontier" in cells
    assert all("distill.lr=0.05" in r[3] and "distill.finetune_lr=0.2" in r[3] for r in ran if r[0] == "study-core")
    n = len(ran)
    assert study.run_part(plan, 10_000, 1, None, log=lambda m: None) is True and len(ran) == n  # nothing twice
    runs = study_plan.load(plan, None)
    # every bracket is within the tolerance on its own axis (the fake's MACs grow as (1/(1 - ratio))^2), and
    # `study --plan` (frontier_todo) has nothing left to probe
    done = study_plan.resolve(plan, runs)
    assert study.frontier_todo(done, runs) == {"macs": [], "bytes": []}
    macs = study_plan.study_probes(done, runs, axis=faxis.AXES["macs"])
    for m in plan.frontier["methods"]:
        for b in plan.frontier["budgets"]:
            f = fsearch.frontier(macs, m, b, bootstrap=0)
            assert f.censored or f.width <= math.log(plan.frontier["tolerance"]) + 1e-9, (m, b, f.width)
    text, files = study_analysis.analyse(study_plan.resolve(plan, runs), runs, tmp_path)
    assert "results logged twice: 0." in text and "not run yet: 0;" in text
    assert "`distill.finetune_lr` = 0.2 for finetune: chosen in cell lr" in text
    assert "## Core grid" in text and "| 0.65 |" in text
    assert "## qat: post-training against quantization-aware INT8" in text
    table = pd.read_csv(tmp_path / "metrics" / "study_channel.csv")
    # every kd_settings row pairs with the core grid's finetune (lr 0.2), also the row whose runs the lr cell ran
    # with its own finetune at lr 0.05 (alpha 0.9, T 4 at the kd lr 0.05)
    ks = table.query("section == 'kd_settings'")
    core_ft = table.query("section == 'core' and ratio == 0.55")["finetune_mean"].item()
    assert len(ks) == 4 and ks["finetune_mean"].to_numpy() == pytest.approx([core_ft] * 4)
    qat = table.query("section == 'qat'")
    diffs = dict(zip(qat["setting"] + "@" + qat["ratio"].astype(str), qat["difference"]))
    assert diffs["QAT-KD - PTQ-KD@0.65"] == pytest.approx(0.7) and diffs["QAT-KD - QAT-FT@0.55"] == pytest.approx(0.4 + 0.1 * math.log(4))
    assert "## Frontier along MAC reduction" in text and "## Frontier along INT8 gzip size reduction" in text
    for axis in ("macs", "bytes"):
        assert (tmp_path / "metrics" / f"study_channel_frontier_{axis}.md").exists()
        assert (tmp_path / "plots" / f"study_channel_frontier_{axis}.png").exists()
    assert not (tmp_path / "metrics" / "study.md").exists()  # the first study's outputs are not touched
    again, _ = study_analysis.analyse(study_plan.resolve(plan, runs), runs, tmp_path)
    assert again == text


def hostile(name, tmp_path, monkeypatch, edit):
    raw = yaml.safe_load((presets.PRESETS / "study-channel.yaml").read_text())
    edit(raw)
    (tmp_path / "presets").mkdir(exist_ok=True)
    (tmp_path / "presets" / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(presets, "PRESETS", tmp_path / "presets")


def cell(raw, name):
    return next(c for c in raw["study"]["cells"] if c["name"] == name)


@pytest.mark.parametrize("edit,message", [
    (lambda r: cell(r, "kd_settings")["set"].update({"distill.lr": {"chosen": "core", "by": "kd"}}),
     "chosen 'core' is not an earlier cell"),
    (lambda r: cell(r, "kd_settings")["set"].update({"distill.lr": {"chosen": "nope", "by": "kd"}}),
     "chosen 'nope' is not an earlier cell"),
    (lambda r: cell(r, "core")["set"].update({"distill.finetune_lr": {"chosen": "kd_settings", "by": "finetune",
                                                                     "key": "distill.alpha"}}),
     "by 'finetune': cell 'kd_settings' runs ['kd']"),
    (lambda r: cell(r, "core")["set"].update({"distill.weight_decay": {"chosen": "lr", "by": "kd"}}),
     "cell 'lr' has no grid over 'distill.weight_decay'"),
    (lambda r: cell(r, "qat")["set"].update({"distill.epochs": {"chosen": "epochs", "by": "kd"}}),
     "(a budget: nothing is chosen along it)"),
    (lambda r: cell(r, "core")["set"].update({"distill.lr": {"chosen": "lr", "by": "kd", "exec": "rm -rf /"}}),
     "a choice is {chosen"),
    (lambda r: cell(r, "core")["set"].update({"distill.lr": {"chosen": "lr", "by": ["kd"]}}), "a choice is {chosen"),
    (lambda r: cell(r, "epochs")["grid"].update({"distill.lr": [{"chosen": "lr", "by": "kd"}]}),
     "grid.distill.lr: a list of 1 to 16 values"),
    (lambda r: r["study"].update(outputs="../../etc/x"), "study.outputs '../../etc/x'"),
    (lambda r: r["study"].update(core="lr"), "study.core 'lr'"),
    (lambda r: r["study"]["frontier"].update(axes=["latency"]), "study.frontier.axes \"['latency']\": distinct names"),
    (lambda r: r["study"]["frontier"].update(axes=["macs", "macs"]), "study.frontier.axes \"['macs', 'macs']\": distinct names"),
    (lambda r: r["study"]["frontier"].update(axes="bytes"), "study.frontier.axes 'bytes'"),
    (lambda r: r["params"].update(quantize={"method": "none"}), "--axis bytes: quantize.method is 'none'"),
    (lambda r: r["params"]["prune"].update(method="magnitude"), "--axis macs: prune.method magnitude removes no MACs"),
    (lambda r: cell(r, "lr")["grid"].update({"distill.lr": [0.01, 11.0]}), "distill.lr = 11.0 is invalid"),
])
def test_a_hostile_choice_is_refused_naming_the_key(tmp_path, monkeypatch, params_path, edit, message):
    hostile("evil", tmp_path, monkeypatch, edit)
    with pytest.raises(study_plan.StudyError) as e:
        study_plan.load_plan("evil", params_path)
    assert message in str(e.value) and "evil.yaml" in str(e.value), str(e.value)


def test_the_report_counts_each_runs_training_precision_from_its_stage_records():
    def run(**kw):
        return pd.Series({"run_id": "r", "params.runtime.bf16": "auto", "acc_kd": 91.0, **kw})
    runs = [run(teacher_bf16=1.0, distill_kd_bf16=1.0), run(cached_teacher_bf16=1.0, distill_kd_bf16=1.0,
                                                             distill_finetune_bf16=float("nan")),
            run(teacher_bf16=0.0, distill_kd_bf16=0.0), run(cached_teacher_bf16=1.0, distill_kd_bf16=0.0),
            run(teacher_bf16="", distill_kd_bf16=None)]
    assert [exp_runs.precision(r) for r in runs] == ["bf16", "bf16", "fp32", "mixed", "unrecorded"]
    # without records, a forced setting decides; auto does not
    assert [exp_runs.precision(pd.Series({"params.runtime.bf16": v})) for v in ("False", "true", "auto", "")] \
        == ["fp32", "bf16", "unrecorded", "unrecorded"]
    line = exp_runs.precision_line(runs)
    assert line.startswith("Training precision (runtime.bf16: auto), per distinct run:")
    assert "under bf16 autocast: 2;" in line and "in fp32: 1;" in line and "in fp32: 1; some" in line
    assert "some stages under bf16 autocast, some in fp32: 1;" in line and "not recorded" in line
