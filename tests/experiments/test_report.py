import math
import os

import pandas as pd
import pytest

from kdprune.experiments import report
from kdprune.experiments import stats as exp_stats
from kdprune.tracking import pipeline as tracking_pipeline
from kdprune.tracking import query as tracking_query
from kdprune.tracking import store as tracking_store
from kdprune.tracking import summary as tracking_summary
from tests.tracking.test_tracking import empty_store  # noqa: F401 - a fixture


def fake_runs(kd, ft, ratios=(0.5, 0.9), seeds=(0, 1, 2)):
    rows = []
    for i, r in enumerate(ratios):
        for j, s in enumerate(seeds):
            rows.append({"run_id": f"r{i}{j}", "start_time": i * 10 + j, "ratio": r, "seed": s,
                         "compression_ratio": 1 / (1 - r), "prunable_compression_ratio": 1 / (1 - r),
                         "acc_teacher": 92.0, "acc_pruned": 50.0 + s, "acc_kd": kd[i][j], "acc_finetune": ft[i][j]})
    return pd.DataFrame(rows)


def test_t_interval_matches_hand_computation():
    mean, lo, hi = exp_stats.t_interval([1.0, 2.0, 3.0])
    # sd = 1, se = 1/sqrt(3), t(0.975, 2) = 4.302653
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert lo == pytest.approx(2 * mean - hi)
    assert math.isnan(exp_stats.t_interval([1.0])[1])


def test_verdicts_say_kd_wins_and_no_difference_plainly():
    df = fake_runs(kd=[[91.0, 91.2, 91.1], [89.0, 88.0, 90.0]], ft=[[90.0, 90.1, 90.0], [89.5, 87.5, 89.9]])
    table, paired = report.summarise(df)
    by_ratio = paired.set_index("ratio")
    assert by_ratio.loc[0.5, "verdict"].startswith("KD wins")
    assert by_ratio.loc[0.9, "verdict"].startswith("no significant difference")
    assert by_ratio.loc[0.5, "n"] == 3
    assert by_ratio.loc[0.5, "kd_minus_finetune"] == pytest.approx((1.0 + 1.1 + 1.1) / 3)
    kd05 = table[(table.ratio == 0.5) & (table.method == "kd")].iloc[0]
    assert kd05.acc_mean == pytest.approx(91.1) and kd05.acc_std == pytest.approx(0.1)
    assert set(table.method) == {"pruned", "kd", "finetune"}
    md = report.markdown(table, paired, len(df), 0)
    assert "91.10 ± 0.10" in md and "no significant difference" in md and "KD wins" in md


def test_finetune_wins_and_single_seed_not_testable():
    df = fake_runs(kd=[[80.0, 80.5, 80.2]], ft=[[85.0, 85.1, 85.3]], ratios=(0.95,))
    _, paired = report.summarise(df)
    assert paired.iloc[0].verdict.startswith("fine-tune wins")
    one = fake_runs(kd=[[80.0]], ft=[[85.0]], ratios=(0.95,), seeds=(0,))
    _, paired = report.summarise(one)
    assert paired.iloc[0].verdict.startswith("not testable")


def test_select_comparable_keeps_swept_keys_only_and_newest():
    df = pd.DataFrame([
        {"run_id": "a", "start_time": 1, "params.prune.ratio": "0.9", "params.seed": "0", "params.teacher.epochs": "5"},
        {"run_id": "b", "start_time": 2, "params.prune.ratio": "0.9", "params.seed": "0", "params.teacher.epochs": "5"},
        {"run_id": "c", "start_time": 3, "params.prune.ratio": "0.8", "params.seed": "1", "params.teacher.epochs": "5"},
        {"run_id": "d", "start_time": 4, "params.prune.ratio": "0.8", "params.seed": "0", "params.teacher.epochs": "9"},
    ])
    runs, excluded = report.select_comparable(df, {"prune.ratio": 0.5, "seed": 0, "teacher.epochs": 5})
    assert list(runs.run_id) == ["c", "b"] and excluded == 1


def test_plot_writes_png(tmp_path):
    df = fake_runs(kd=[[91.0, 91.2, 91.1], [89.0, 88.0, 90.0]], ft=[[90.0, 90.1, 90.0], [89.5, 87.5, 89.9]])
    table, _ = report.summarise(df)
    report.plot(table, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_table_groups_settings_and_variants():
    rows = []
    settings = [("magnitude", "0.9", "oneshot", "0.0"), ("l1_filter", "0.5", "oneshot", "0.0"),
                ("magnitude", "0.9", "agp", "0.0")]
    for i, (method, ratio, schedule, beta) in enumerate(settings):
        for seed in (0, 1):
            row = {"run_id": f"{i}{seed}", "start_time": 10 * i + seed, "params.prune.method": method,
                   "params.prune.ratio": ratio, "params.prune.schedule": schedule, "params.distill.at_beta": beta,
                   "params.seed": str(seed), "params.teacher.epochs": "6", "acc_teacher": 92.0,
                   "compression_ratio": 9.3 if method == "magnitude" else 1.9, "mac_reduction": 1.0,
                   "acc_pruned": 10.0 + seed, "acc_kd": 90.0 + seed + i, "acc_finetune": 89.0 + seed,
                   "speedup_b128_kd": 1.0, "speedup_b128_finetune": 1.2}
            if i == 1:
                row.update(acc_scratch=80.0 + 2 * seed, acc_scratch_kd=81.0)
            rows.append(row)
    rows.append({**rows[0], "run_id": "old", "start_time": -1})  # an older duplicate of (setting 0, seed 0)
    rows.append({**rows[0], "run_id": "other", "params.teacher.epochs": "9"})  # another teacher: excluded
    df = pd.DataFrame(rows)
    runs, excluded = report.select_settings(df, {"prune.method": "magnitude", "prune.ratio": 0.8, "seed": 0,
                                                 "teacher.epochs": 6, "distill.variants": ["kd"]})
    assert excluded == 1 and "old" not in set(runs.run_id) and len(runs) == 6
    table = report.methods_table(runs)
    assert list(zip(table["prune.method"], table["prune.schedule"])) == [("l1_filter", "oneshot"),
                                                                         ("magnitude", "agp"), ("magnitude", "oneshot")]
    l1 = table.iloc[0]
    assert l1["kd_mean"] == pytest.approx(91.5) and l1["kd_std"] == pytest.approx(math.sqrt(0.5))
    assert l1["scratch_mean"] == pytest.approx(81.0) and l1["scratch_n"] == 2 and l1["speedup_b128"] == pytest.approx(1.1)
    assert table.iloc[2]["scratch_n"] == 0
    md = report.methods_markdown(table)
    assert "| l1_filter | 0.5 | oneshot | 0 | 1.90x |" in md and "81.00 ± 1.41 (2)" in md and "| - |" in md


def test_plural():
    assert tracking_summary.plural(1, "seed") == "1 seed" and tracking_summary.plural(2, "run") == "2 runs"
    assert tracking_summary.plural(0, "run") == "0 runs"


def test_report_traces_every_number_and_logs_to_its_own_experiment(tmp_path, monkeypatch, empty_store):
    """metrics/report_runs.csv holds, per run used, its id, status, every param and every metric (a clone
    without mlflow.db can trace each number); the summary run goes to '<experiment>-reports'."""
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")

    from mlflow.tracking import MlflowClient

    from tests.tracking.test_tracking import make_result

    for d, ratio, acc in (("a", 0.8, 90.0), ("b", 0.9, 88.5)):
        (tmp_path / d).mkdir()
        make_result(tmp_path / d, ratio=ratio, acc_kd=acc)
        tracking_pipeline.log_pipeline(tmp_path / d, {"DVC_ROOT": str(tmp_path)})
    shutil.copy(tmp_path / "b" / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith(("DVC_", "MLFLOW_TRACKING"))]:
        monkeypatch.delenv(k)
    titles = []
    real_plot = report.plot
    monkeypatch.setattr(report, "plot", lambda table, path, title: (titles.append(title),
                                                                     real_plot(table, path, title)))
    uri = tracking_store.tracking_uri()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("kdprune")
    pipeline_ids = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    # a RUNNING run (an interrupted track) is no result: not used, not cited
    client.create_run(exp.experiment_id, tags={tracking_store.KIND_TAG: "pipeline"})

    assert report.main([]) == 0
    csv = pd.read_csv(tmp_path / "metrics" / "report_runs.csv")
    assert set(csv["run_id"]) == pipeline_ids and set(csv["status"]) == {"FINISHED"}
    assert {"params.prune.ratio", "params.seed", "params.distill.variants", "params.teacher.epochs", "acc_kd",
            "acc_teacher", "compression_ratio", "mac_reduction", "kd_train_loss"} <= set(csv.columns)
    assert sorted(csv["params.prune.ratio"]) == [0.8, 0.9] and sorted(csv["acc_kd"]) == [88.5, 90.0]
    assert titles and titles[0].endswith("(1 seed)")
    # the summary run is not among the pipeline runs (the pipeline runs and the RUNNING one)
    assert all(r.data.tags.get(tracking_store.KIND_TAG) == "pipeline" for r in client.search_runs([exp.experiment_id]))
    rexp = client.get_experiment_by_name("kdprune-reports")
    (summary,) = client.search_runs([rexp.experiment_id])
    assert summary.info.run_name == "report (2 runs of kdprune)" and summary.info.status == "FINISHED"
    assert rexp.tags[tracking_store.EXPERIMENT_KIND_TAG] == tracking_store.EXPERIMENT_KIND
    assert "report_runs.csv" in {a.path for a in client.list_artifacts(summary.info.run_id)}

    # a fresh clone: an empty MLflow store and the committed records give the same report
    md = (tmp_path / "metrics" / "report.md").read_text()
    shutil.copy(tmp_path / "metrics" / "report_runs.csv", tmp_path / "records.csv")
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    assert report.main(["--no-mlflow-summary"]) == 2  # nothing in the store
    assert report.main(["--records", "records.csv", "--no-mlflow-summary"]) == 0
    assert (tmp_path / "metrics" / "report.md").read_text() == md
    (tmp_path / "bad.csv").write_text("no,run,ids\n1,2,3\n")
    assert report.main(["--records", "bad.csv", "--no-mlflow-summary"]) == 2


def test_runs_table_has_ids_status_params_and_metrics_not_derived_columns():
    df = pd.DataFrame([{"run_id": "b", "status": "FINISHED", "dvc_exp_name": "e2", "params.seed": "1",
                        "params.prune.ratio": "0.9", "acc_kd": 90.5, "ratio": 0.9, "seed": 1},
                       {"run_id": "a", "status": "FINISHED", "dvc_exp_name": "e1", "params.seed": "0",
                        "params.prune.ratio": "0.8", "acc_kd": 91.0, "ratio": 0.8, "seed": 0}])
    t = tracking_query.runs_table(df)
    assert list(t.columns) == ["run_id", "status", "dvc_exp_name", "params.prune.ratio", "params.seed", "acc_kd"]
    assert list(t.run_id) == ["a", "b"]
