"""kdprune.study: the committed study plan validates; hostile plans are refused naming the key; parts resume
from the records alone and stop on time; the analysis (Holm, the check tables, the frontier) on fake runs."""
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from kdprune import presets
from kdprune.experiments import queue as exp_queue
from kdprune.experiments import runs as exp_runs
from kdprune.experiments import stats as exp_stats
from kdprune.experiments import study, study_analysis, study_plan
from tests.helpers import committed_params_text


@pytest.fixture
def params_path(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(committed_params_text())
    return p


def test_the_committed_study_plan_validates_and_is_sized(params_path):
    plan = study_plan.load_plan("study-fashion", params_path)
    cells = [e.cell for e in plan.experiments]
    assert cells.count("core") == 20 and cells[0] == "core"
    assert {e.ratio for e in plan.experiments if e.cell == "core"} == {0.9, 0.95, 0.98, 0.99}
    assert {e.seed for e in plan.experiments if e.cell == "core"} == {0, 1, 2, 3, 4}
    core = plan.experiments[0].flat
    assert core["distill.epochs"] >= 5 and core["teacher.epochs"] > 6 and core["distill.variants"] == ["kd", "finetune"]
    for cell in ("scratch", "kd_settings", "lr", "epochs"):
        es = [e for e in plan.experiments if e.cell == cell]
        assert es and {e.ratio for e in es} == {0.98} and len({e.seed for e in es}) >= 3
    assert {e.flat["distill.lr"] for e in plan.experiments if e.cell == "lr"} | {plan.base["distill.lr"]} == {0.01, 0.05, 0.2}
    assert {e.flat["distill.epochs"] for e in plan.experiments if e.cell == "epochs"} == {1, 3, 10}
    chosen = [e for e in plan.experiments if e.cell == "kd_chosen"]  # kd alone at the setting chosen on train
    assert {(e.seed, e.ratio) for e in chosen} == {(e.seed, e.ratio) for e in plan.experiments if e.cell == "core"}
    assert all(study_plan.target(plan, e)[1] == ["kd"] and study_analysis.borrows_finetune(plan, "kd_chosen") for e in chosen)
    assert plan.frontier["cell"] == "kd_chosen" and study_analysis.kd_settings_of(plan, "kd_chosen") == {
        "distill.alpha": 0.5, "distill.temperature": 2.0}
    assert plan.frontier["budgets"] == [0.5, 1.0, 2.0] and plan.records.as_posix() == "metrics/study_runs.csv"
    assert study_plan.frontier_range(plan) == pytest.approx((2, 100))  # below the core grid: 1 pt is lost by 10x
    plan.frontier.pop("lo")
    assert study_plan.frontier_range(plan) == pytest.approx((10, 100))  # the default: the first cell's range


def hostile(tmp_path, monkeypatch, mutate):
    raw = yaml.safe_load((presets.PRESETS / "study-fashion.yaml").read_text())
    mutate(raw)
    d = tmp_path / "presets"
    d.mkdir(exist_ok=True)
    (d / "evil.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(presets, "PRESETS", d)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r["study"]["cells"][0].update(name="core; rm -rf /"), "study.cells[0].name"),
    (lambda r: r["study"]["cells"][0].update(ratios=[1.0]), "study.cells[0].ratios: '1.0' is not allowed"),
    (lambda r: r["study"]["cells"][0].update(ratios=[float("nan")]), "study.cells[0].ratios"),
    (lambda r: r["study"]["cells"][0].update(seeds=[-1]), "study.cells[0].seeds"),
    (lambda r: r["study"]["cells"][0].update(seeds=[0, 0]), "values repeat"),
    (lambda r: r["study"]["cells"][1].update(set={"prune.ratio": 0.5}), "key 'prune.ratio' is not allowed"),
    (lambda r: r["study"]["cells"][1].update(set={"teacher.typo": 1}), "key 'teacher.typo' is not allowed"),
    (lambda r: r["study"]["cells"][3].update(grid={"distill.lr": [1e30]}), "distill.lr"),
    (lambda r: r["study"]["cells"][3].update(grid={"distill.lr": list(range(1, 18))}), "a list of 1 to 16 values"),
    (lambda r: r["study"].update(records="../../etc/x.csv"), "study.records"),
    (lambda r: r["study"].update(extra=1), "unknown keys ['extra']"),
    (lambda r: r["study"]["frontier"].update(budgets=[-1]), "study.frontier"),
    (lambda r: r["study"]["frontier"].update(lo=50, hi=20), "lo 50 must be below hi 20"),
    (lambda r: r["study"]["frontier"].update(cell="nope"), "study.frontier.cell 'nope'"),
    (lambda r: r["study"]["frontier"].update(cell="lr"), "study.frontier.cell 'lr'"),  # a grid: which setting?
    (lambda r: r["study"]["cells"].extend([{"name": f"c{i}", "ratios": [0.5 + i / 200 for i in range(60)],
                                            "seeds": list(range(60))} for i in range(2)]), "more than 2000"),
])
def test_a_hostile_plan_is_refused_naming_the_key(tmp_path, monkeypatch, params_path, mutate, message):
    hostile(tmp_path, monkeypatch, mutate)
    with pytest.raises(study_plan.StudyError, match=None) as e:
        study_plan.load_plan("evil", params_path)
    assert message in str(e.value) and "evil.yaml" in str(e.value)


def test_holm_adjusts_step_down():
    assert exp_stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert exp_stats.holm([0.5, float("nan")])[0] == 0.5 and math.isnan(exp_stats.holm([0.5, float("nan")])[1])
    assert exp_stats.holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])


def fake_row(plan, e, t: int) -> dict:
    flat, variants = study_plan.target(plan, e)
    c = 1 / (1 - e.ratio)
    row = {"run_id": f"r{t:04d}", "status": "FINISHED", "start_time": str(1000 * t), "end_time": str(1000 * t + 600_000)}
    row.update({f"params.{k}": str(v) for k, v in flat.items()})
    drop = math.log(c) ** 2 / 4
    lr = float(flat["distill.lr"])
    row.update(acc_teacher=93.0 + 0.1 * e.seed, acc_pruned=40.0, compression_ratio=c, prunable_compression_ratio=c,
               mac_reduction=c * 0.9)
    for v in variants:
        gain = {"kd": 0.6, "finetune": 0.0, "scratch": -3.0, "scratch_kd": -2.0}[v]
        row[f"acc_{v}"] = 93.0 - drop + gain + 0.1 * e.seed - abs(math.log(lr / 0.05)) * 0.2
        row[f"train_acc_{v}"] = row[f"acc_{v}"] + 2 + (float(flat["distill.alpha"]) if v == "kd" else 0)
    return row


def small_plan(tmp_path, monkeypatch, params_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(params_path.read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a.db'}")
    plan = study_plan.load_plan("study-fashion", tmp_path / "params.yaml")
    plan.cells = [dataclasses.replace(c, seeds=[s for s in c.seeds if s in (0, 1)]) for c in plan.cells]
    plan = study_plan.resolve(plan, pd.DataFrame())  # a smaller plan, the same logic
    plan.frontier["seeds"] = [0, 1]
    plan.records.parent.mkdir(parents=True, exist_ok=True)
    return plan


def fake_sweep(monkeypatch, plan, ran: list, clock: list, minutes_each=lambda prefix: 10):
    """sweep.run_grid replaced: each point appends a fake run to the records and advances the fake clock."""
    monkeypatch.setattr(study, "clock", lambda: clock[0])

    def run_grid(grid, extra, jobs, prefix, experiment, log=print):
        for seed, ratio, sets in grid:
            ran.append((prefix, seed, ratio, sets))
            probe = {**study_plan.cell_experiment(plan).flat, "distill.variants": plan.frontier["methods"]}
            e = next((x for x in plan.experiments if x.seed == seed and x.ratio == ratio and x.sets() == sets),
                     None) or study_plan.Experiment("frontier", seed, ratio, tuple(sorted(probe.items())))
            assert e.sets() == sets
            old = exp_runs.read_records(plan.records)
            new = pd.DataFrame([fake_row(plan, e, len(old) + len(ran))]).astype(str)
            pd.concat([old.astype(str), new]).to_csv(plan.records, index=False)
            clock[0] += 60 * minutes_each(prefix)
        return {}, {}, {}, 0.0
    monkeypatch.setattr(exp_queue, "run_grid", run_grid)


def test_parts_stop_on_time_and_resume_from_the_records_alone(tmp_path, monkeypatch, params_path):
    plan = small_plan(tmp_path, monkeypatch, params_path)
    ran: list = []
    fake_sweep(monkeypatch, plan, ran, [0.0])
    assert study.run_part(plan, 25, 1, None, log=lambda m: None) is False
    assert len(ran) == 3 and [r[0] for r in ran] == ["study-core"] * 3  # 0, 10, 20 min started; none after 25
    first = set(ran)
    # a fresh machine: only the records file; the next part continues where this one stopped
    assert study.run_part(plan, 10_000, 1, None, log=lambda m: None) is True
    assert not first & set(ran[3:])
    done = {(r[1], r[2], r[3]) for r in ran if r[0] != "study-frontier"}
    covered = [e for e in plan.experiments if (e.seed, e.ratio, e.sets()) not in done]
    assert covered and all(e.cell == "kd_settings" and e.flat["distill.alpha"] == 0.9 and e.flat["distill.temperature"]
                           == 4.0 for e in covered)  # the core grid's runs cover the default KD setting
    chosen = {r[2] for r in ran if r[0] == "study-kd_chosen"}
    assert chosen == {0.9, 0.95, 0.99}  # at 0.98 kd_settings' runs at alpha 0.5, T 2 are kd_chosen's
    assert any(r[0] == "study-frontier" for r in ran)  # then the bisection between the core ratios
    n = len(ran)
    assert study.run_part(plan, 10_000, 1, None, log=lambda m: None) is True and len(ran) == n  # nothing twice

    runs = study_plan.load(plan, None)
    text, files = study_analysis.analyse(plan, runs, tmp_path)
    assert "results logged twice: 0." in text and "not run yet: 0;" in text
    e = plan.experiments[0]
    twice = pd.concat([runs, runs[runs["run_id"] == study_plan.run_for(plan, runs, e)["run_id"]].assign(run_id="again")])
    assert study_plan.duplicates(plan, twice, e) == 1 and study_plan.duplicates(plan, runs, e) == 0
    assert "## Core grid" in text and "Holm" in text and "| 0.98 |" in text
    core = pd.read_csv(tmp_path / "metrics" / "study.csv")
    c = core[core["section"] == "core"]
    assert np.allclose(c["kd_minus_finetune"], 0.6) and len(c) == 4
    assert "Chosen on training accuracy: distill.alpha=0.9" in text  # the selection reads train_acc, not test
    assert "## kd_chosen: kd at alpha 0.5, temperature 2 vs finetune" in text
    assert "NOTE: the kd_settings cell chose distill.alpha=0.9" in text  # the fake's train_acc grows with alpha
    chosen = pd.read_csv(tmp_path / "metrics" / "study.csv").query("section == 'kd_chosen'")
    assert len(chosen) == 4 and np.allclose(chosen["kd_minus_finetune"], 0.6) and chosen["p_holm"].notna().all()
    assert "## lr" in text and "| 0.2 |" in text and "| 0.05 |" in text  # the core's lr as the default row
    assert "## epochs" in text and "| 5 |" in text
    assert "## scratch" in text and "## Frontier" in text and "kd reaches" in text
    assert "Not searched yet" not in text and "PRELIMINARY" not in text  # the bisection ran
    assert (tmp_path / "plots" / "frontier.png").exists()


def test_a_part_stops_between_the_frontier_probes_seeds_and_resumes_without_rerunning_one(tmp_path, monkeypatch,
                                                                                         params_path):
    plan = small_plan(tmp_path, monkeypatch, params_path)
    ran: list = []
    fake_sweep(monkeypatch, plan, ran, [0.0], minutes_each=lambda prefix: 10 if prefix == "study-frontier" else 0)
    assert study.run_part(plan, 5, 1, None, log=lambda m: None) is False  # the cells cost no time here
    probes = [r for r in ran if r[0] == "study-frontier"]
    assert [(r[1], r[2]) for r in probes] == [(0, 0.5)]  # the range's low end (2x), seed 0; seed 1 not started
    assert study_plan.study_probes(plan, study_plan.load(plan, None)) and 0.5 not in {
        p.ratio for p in study_plan.study_probes(plan, study_plan.load(plan, None))}  # half a probe is no probe
    assert len(exp_runs.read_records(plan.records)) == len(ran)  # the part's last run is in the records already
    text = study_analysis.analyse(plan, study_plan.load(plan, None), tmp_path)[0]
    assert ("Frontier search's own runs (probes at ratios no cell plans): 1 at 1 ratio(s) (0.5); complete probes "
            "(every seed): 0; results logged twice: 0.") in text and "over those runs and the search's" in text
    assert [(e.seed, e.ratio) for e in study_plan.frontier_experiments(plan, [0.8, 0.95])][:3] == [
        (0, 0.8), (0, 0.95), (1, 0.8)]  # a batch runs seed by seed: each seed's teacher is needed once
    assert study.run_part(plan, 10_000, 1, None, log=lambda m: None) is True
    points = [(r[1], r[2]) for r in ran if r[0] == "study-frontier"]
    assert len(points) == len(set(points)) > 2 and points[1] == (1, 0.5)  # seed 1 next; nothing twice
    runs = study_plan.load(plan, None)
    assert {p.ratio for p in study_plan.study_probes(plan, runs)} >= {0.5, 0.9, 0.99}
    own = study_plan.frontier_own(plan, runs)
    assert sorted((e.seed, e.ratio) for e, _ in own) == sorted(points)  # every probe run counted, no cell's run
    again = runs[runs["run_id"] == own[0][1]["run_id"]].assign(run_id="again", start_time="1")
    text = study_analysis.analyse(plan, pd.concat([runs, again]), tmp_path)[0]
    assert f"{len(points)} at {len(set(p[1] for p in points))} ratio(s)" in text and "logged twice: 1." in text


def test_a_partial_study_reports_a_preliminary_frontier_on_the_complete_seeds(tmp_path, monkeypatch, params_path):
    monkeypatch.chdir(tmp_path)
    plan = study_plan.load_plan("study-fashion", params_path)
    core = [e for e in plan.experiments if e.cell == "core"]
    plan.records.parent.mkdir(parents=True)
    rows = [fake_row(plan, e, i) for i, e in enumerate(x for x in core if x.seed == 0)]
    rows.append(fake_row(plan, next(e for e in core if e.seed == 1), 99))  # seed 1: one ratio of four
    # 7 done: seed 0 x 4, seed 1 x 1, and their 0.98 runs cover the default KD setting of kd_settings
    pd.DataFrame(rows).astype(str).to_csv(plan.records, index=False)
    runs = study_plan.load(plan, None)
    assert study_plan.preliminary_seeds(plan, runs, "core") == [0] and study_plan.preliminary_seeds(plan, runs) == []
    text, files = study_analysis.analyse(plan, runs, tmp_path)
    assert "PRELIMINARY: the frontier's own cell" in text and "one seed gives no interval" in text
    assert "not run yet: 63;" in text and (tmp_path / "plots" / "frontier.png").exists()
    assert "kd_chosen, has every ratio done for no seed yet, so this is the core cell's frontier on seed(s) 0;" in text
    points = pd.read_csv(tmp_path / "metrics" / "frontier_points.csv")
    assert points["ci95_low"].isna().all()  # n = 1: no bootstrap bracket is claimed
    # seed 0 finishes kd_chosen: the preliminary frontier moves to the frontier's own cell (kd at alpha 0.5)
    chosen = [e for e in plan.experiments if e.cell == "kd_chosen" and e.seed == 0]
    rows += [{**fake_row(plan, e, 200 + i), "acc_kd": 11.0} for i, e in enumerate(chosen)]
    pd.DataFrame(rows).astype(str).to_csv(plan.records, index=False)
    text, files = study_analysis.analyse(plan, study_plan.load(plan, None), tmp_path)
    assert "PRELIMINARY: only seed(s) 0 of 5 have finished every ratio of the kd_chosen cell" in text
    assert "kd at alpha 0.5, temperature 2" in text and "kd reaches < " in text  # kd at 11 %: below every budget
    # the core grid gets ahead (seeds 0 and 1 complete): its frontier is shown until kd_chosen catches up
    rows += [fake_row(plan, e, 300 + i) for i, e in enumerate(x for x in core if x.seed == 1)]
    pd.DataFrame(rows).astype(str).to_csv(plan.records, index=False)
    text, files = study_analysis.analyse(plan, study_plan.load(plan, None), tmp_path)
    assert ("kd_chosen, has every ratio done for seed(s) 0 only, so this is the core cell's frontier on seed(s) 0, 1;"
            in text) and "kd at alpha 0.9, temperature 4" in text


def test_a_frontier_from_the_core_grid_alone_says_it_is_not_searched_yet(tmp_path, monkeypatch, params_path):
    monkeypatch.chdir(tmp_path)
    plan = study_plan.load_plan("study-fashion", params_path)
    grid = [e for e in plan.experiments if e.cell in ("core", "kd_chosen")]
    plan.records.parent.mkdir(parents=True)
    pd.DataFrame([fake_row(plan, e, i) for i, e in enumerate(grid)]).astype(str).to_csv(plan.records, index=False)
    text, _ = study_analysis.analyse(plan, study_plan.load(plan, None), tmp_path)
    assert "PRELIMINARY" not in text and "kd reaches" in text
    assert "Not searched yet: every probe is one of the kd_chosen cell's ratios" in text
    assert "The probes run the kd_chosen cell's params: kd at alpha 0.5, temperature 2" in text


def test_seeds_at_chance_are_counted_per_ratio(tmp_path, monkeypatch, params_path):
    """A seed whose pruned network cannot train (layer collapse: kd and finetune both at 10 %) is counted and
    explained, not hidden in the mean."""
    monkeypatch.chdir(tmp_path)
    plan = study_plan.load_plan("study-fashion", params_path)
    core = [e for e in plan.experiments if e.cell == "core" and e.seed in (0, 1)]
    plan.records.parent.mkdir(parents=True)
    rows = [fake_row(plan, e, i) for i, e in enumerate(core)]
    for r in rows:
        if r["params.prune.ratio"] == "0.99" and r["params.seed"] == "1":
            r.update(acc_kd=10.0, acc_finetune=10.0)
        if r["params.prune.ratio"] == "0.95" and r["params.seed"] == "1":
            r.update(acc_kd=10.0, acc_finetune=60.0)  # only one of the two at chance: not a collapse
    pd.DataFrame(rows).astype(str).to_csv(plan.records, index=False)
    text, _ = study_analysis.analyse(plan, study_plan.load(plan, None), tmp_path)
    core_text = text.split("## Core grid")[1].split("\n## ")[0]
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in core_text.splitlines()
             if line.startswith("| 0.9")}
    assert table["0.99"][7] == "1" and table["0.95"][7] == "0" and table["0.9"][7] == "0", table
    assert "within 1 point of chance (10.00 %)" in text and "1 so far" in text
    out = pd.read_csv(tmp_path / "metrics" / "study.csv")
    assert out.loc[(out["section"] == "core") & (out["ratio"] == 0.99), "seeds_at_chance"].item() == 1


def test_a_check_compares_its_seeds_with_the_core_runs_of_the_same_seeds(tmp_path, monkeypatch, params_path):
    """The lr check runs seeds 0-2; its default-lr row comes from the core grid, which has seeds 0-4 at 0.98.
    The row must use the core runs of seeds 0-2 only, or it would compare different seeds (and teachers)."""
    monkeypatch.chdir(tmp_path)
    plan = study_plan.load_plan("study-fashion", params_path)
    core = [e for e in plan.experiments if e.cell == "core" and e.ratio == 0.98]
    lr = [e for e in plan.experiments if e.cell == "lr"]
    assert sorted(e.seed for e in core) == [0, 1, 2, 3, 4] and sorted({e.seed for e in lr}) == [0, 1, 2]
    plan.records.parent.mkdir(parents=True)
    rows = [fake_row(plan, e, i) for i, e in enumerate(core + lr)]
    for r in rows:
        if r["params.seed"] in ("3", "4"):  # seeds the check did not run: far off, so a leak shows
            r.update(acc_kd=20.0, acc_finetune=20.0)
    pd.DataFrame(rows).astype(str).to_csv(plan.records, index=False)
    text, _ = study_analysis.analyse(plan, study_plan.load(plan, None), tmp_path)
    section = text.split("## lr")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| 0.05 |")).split(" | ")
    expected = np.mean([fake_row(plan, e, 0)["acc_kd"] for e in core if e.seed < 3])
    assert row[1].startswith(f"{expected:.2f}") and row[-1].strip(" |") == "3", row


def test_each_method_is_also_compared_at_its_own_train_selected_learning_rate(tmp_path, monkeypatch, params_path):
    """The lr check chooses kd's lr on train_acc_kd and finetune's on train_acc_finetune, and pairs the two choices
    by seed; the epochs check is a budget axis and chooses nothing."""
    monkeypatch.chdir(tmp_path)
    plan = study_plan.load_plan("study-fashion", params_path)
    runs = [e for e in plan.experiments if (e.cell == "core" and e.ratio == 0.98) or e.cell in ("lr", "epochs")]
    plan.records.parent.mkdir(parents=True)
    rows = [fake_row(plan, e, i) for i, e in enumerate(runs)]
    for r in rows:
        seed, lr = int(r["params.seed"]), float(r["params.distill.lr"])
        if lr == 0.2:  # finetune fits train best at 0.2, kd at 0.05 (the fake's default curve)
            r.update(acc_finetune=85.0 + seed, train_acc_finetune=99.0)
        if lr == 0.05 and int(r["params.distill.epochs"]) == 5:
            r.update(acc_kd=80.0 + 2 * seed)
    pd.DataFrame(rows).astype(str).to_csv(plan.records, index=False)
    text, _ = study_analysis.analyse(plan, study_plan.load(plan, None), tmp_path)
    lr = text.split("## lr")[1].split("\n## ")[0]
    assert "Chosen on training accuracy: distill.lr=0.05" in lr
    assert ("Each method at its own setting chosen on its own training accuracy: kd at distill.lr=0.05, finetune at "
            "distill.lr=0.2 (train_acc_finetune 99.00 %; test 86.00 %): KD − FT -4.00 [" in lr)  # 80+2s - (85+s), s<3
    assert "(n = 3)" in lr
    epochs = text.split("## epochs")[1].split("\n## ")[0]
    assert "| 10 |" in epochs and "Chosen" not in epochs and "own setting" not in epochs and "(selection)" not in epochs
    assert "distill.epochs is a budget: nothing is chosen along it" in epochs
    out = pd.read_csv(tmp_path / "metrics" / "study.csv")
    own = out[out["setting"].astype(str).str.startswith("each method's own choice")]
    assert len(own) == 1 and own["kd_minus_finetune"].item() == pytest.approx(-4.0)


def test_kd_settings_pair_each_setting_with_the_core_finetune_of_the_same_seeds(tmp_path, monkeypatch, params_path):
    """kd_settings runs kd alone (fine-tuning reads neither alpha nor temperature): each setting's KD − FT pairs
    its kd runs with the core grid's finetune runs of the same seeds and ratio, and the chosen setting says its
    own KD − FT."""
    monkeypatch.chdir(tmp_path)
    plan = study_plan.load_plan("study-fashion", params_path)
    core = [e for e in plan.experiments if e.cell == "core" and e.ratio == 0.98]
    kds = [e for e in plan.experiments if e.cell == "kd_settings"]
    assert {e.seed for e in kds} == {0, 1, 2} and all(study_plan.target(plan, e)[1] == ["kd"] for e in kds)
    plan.records.parent.mkdir(parents=True)
    rows = [fake_row(plan, e, i) for i, e in enumerate(core + kds)]
    assert all("acc_finetune" not in r for r in rows[len(core):])
    for r in rows[:len(core)]:
        r["acc_finetune"] = 80.0 + int(r["params.seed"])  # 80, 81, 82 for the check's seeds; 83, 84 leak
    pd.DataFrame(rows).astype(str).to_csv(plan.records, index=False)
    text, _ = study_analysis.analyse(plan, study_plan.load(plan, None), tmp_path)
    section = text.split("## kd_settings")[1].split("\n## ")[0]
    assert "finetune run of the same seed and ratio" in section
    for line in (x for x in section.splitlines() if x.startswith("| 0.")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        alpha, temp = float(cells[0]), float(cells[1])
        kd = [r["acc_kd"] for r in rows if r["params.distill.alpha"] == str(alpha)
              and r["params.distill.temperature"] == str(temp) and r["params.seed"] in ("0", "1", "2")]
        if (alpha, temp) != (0.9, 4.0):
            kd = kd[-3:]  # the kd_settings runs (the core's own kd is the default row)
        assert cells[3].startswith("81.00"), line  # the finetune of seeds 0-2 only
        assert cells[5].startswith(f"{np.mean(kd) - 81.0:+.2f}"), line
    assert "Chosen on training accuracy: distill.alpha=0.9" in section and ", KD − FT +" in section


def test_kd_chosen_pairs_each_ratio_with_the_core_finetune_of_the_same_teacher(tmp_path, monkeypatch, params_path):
    """kd_chosen runs kd alone at alpha 0.5, T 2 over the core ratios: its per-ratio KD − FT (Holm) pairs each seed
    with the core grid's finetune of the same seed and ratio, and drops (and counts) a pair whose teacher differs."""
    monkeypatch.chdir(tmp_path)
    plan = study_plan.load_plan("study-fashion", params_path)
    grid = [e for e in plan.experiments if e.cell in ("core", "kd_chosen") and e.seed < 3]
    plan.records.parent.mkdir(parents=True)
    rows = [fake_row(plan, e, i) for i, e in enumerate(grid)]
    for r in rows:
        if "acc_finetune" in r:
            r["acc_finetune"] = 80.0 + int(r["params.seed"])
        else:
            r["acc_kd"] = 81.0 + 2 * int(r["params.seed"])  # KD − FT = 1 + seed: mean 2 over seeds 0-2
        if r["params.prune.ratio"] == "0.9" and r["params.seed"] == "2" and "acc_finetune" not in r:
            r["acc_teacher"] = 90.0  # another teacher: never paired
    pd.DataFrame(rows).astype(str).to_csv(plan.records, index=False)
    text, _ = study_analysis.analyse(plan, study_plan.load(plan, None), tmp_path)
    section = text.split("## kd_chosen")[1].split("\n## ")[0]
    assert "core grid's finetune run of the same seed and ratio" in section and "Holm-adjusted" in section
    assert "1 run(s) of this cell have no core-grid finetune with the same teacher" in section
    out = pd.read_csv(tmp_path / "metrics" / "study.csv").query("section == 'kd_chosen'").set_index("ratio")
    assert out.loc[0.98, "kd_minus_finetune"] == pytest.approx(2.0) and out.loc[0.98, "n"] == 3
    assert out.loc[0.9, "kd_minus_finetune"] == pytest.approx(1.5) and out.loc[0.9, "n"] == 2
    assert out["p_holm"].notna().all()


@pytest.mark.parametrize("name", ["../params", "/etc/passwd", "study-fashion/../../params", ""])
def test_the_preset_is_a_name_never_a_path(tmp_path, name, capsys):
    (tmp_path / "params.yaml").write_text(committed_params_text())
    with pytest.raises(study_plan.StudyError, match="unknown preset"):
        study_plan.load_plan(name, tmp_path / "params.yaml")
