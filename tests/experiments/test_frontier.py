"""kdprune.frontier: the bisection on a fake accuracy curve, the bootstrap bracket, resume from the records
file alone (a fresh machine), the CLI's and params' errors, and a tiny real search through DVC's queue."""
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from kdprune.experiments import args as exp_args
from kdprune.experiments import frontier as F
from kdprune.experiments import frontier_report as freport
from kdprune.experiments import frontier_search as fsearch
from kdprune.experiments import queue as exp_queue
from kdprune.experiments import runs as exp_runs
from kdprune.params import flatten
from tests.helpers import default_params

TEACHER = 93.0
SLOPE = {"kd": 0.5, "finetune": 0.8}  # points lost per (ln c - ln 5)^2: kd degrades more slowly


def fake_acc(method: str, c: float, seed: int) -> float:
    noise = 0.05 * ((seed * 7919 + int(c * 100)) % 7 - 3)
    return TEACHER - SLOPE[method] * max(0.0, math.log(c) - math.log(5)) ** 2 + noise


def exact_frontier(method: str, budget: float) -> float:
    return 5 * math.exp(math.sqrt(budget / SLOPE[method]))


def fake_probe(ratio: float, seeds: list[int]) -> fsearch.Probe:
    c = 1 / (1 - ratio)
    return fsearch.Probe(ratio, list(seeds), {m: np.array([fake_acc(m, c, s) for s in seeds]) for m in SLOPE},
                   np.full(len(seeds), TEACHER), c, c, [f"run-{ratio}-{s}" for s in seeds])


def test_axis_round_trips_and_rounds_ratios():
    assert fsearch.ratio_of_compression(20) == 0.95 and fsearch.ratio_of_compression(50) == 0.98
    assert fsearch.ratio_of_u(fsearch.u_of_ratio(0.9)) == 0.9
    assert math.isclose(math.exp(fsearch.u_of_ratio(0.99)), 100)


def test_bisection_finds_the_frontier_of_a_fake_curve_to_the_tolerance():
    seeds = [0, 1, 2]
    store: dict[float, fsearch.Probe] = {}
    batches = []

    def run(ratios):
        batches.append(list(ratios))
        for r in ratios:
            assert r not in store, f"ratio {r} probed twice"
            store[r] = fake_probe(r, seeds)
        return sorted(store.values(), key=lambda p: p.ratio)

    probes = fsearch.search(run, [], list(SLOPE), [0.5, 1.0, 2.0], lo=2, hi=200, tolerance=1.1, max_probes=40,
                      log=lambda m: None)
    assert batches[0] == [0.5, 0.995]  # the range's ends first
    for budget in (0.5, 1.0, 2.0):
        for m in SLOPE:
            f = fsearch.frontier(probes, m, budget)
            assert f.lo is not None and f.hi is not None and f.width <= math.log(1.1) + 1e-9
            assert f.lo.compression <= f.estimate <= f.hi.compression
            assert abs(math.log(f.estimate / exact_frontier(m, budget))) < math.log(1.1), (m, budget, f.estimate)
            assert f.interval[0] <= f.estimate <= f.interval[1]
    # kd's frontier lies further out than finetune's at every budget, as the fake curve says
    assert all(fsearch.frontier(probes, "kd", b).estimate > fsearch.frontier(probes, "finetune", b).estimate for b in (0.5, 1, 2))


def test_search_stops_at_max_probes_and_a_failed_probe_is_an_error():
    probes = fsearch.search(lambda rs: [fake_probe(r, [0, 1]) for r in rs], [], ["kd"], [1.0], 2, 200, 1.05, 2,
                      log=lambda m: None)
    assert [p.ratio for p in probes] == [0.5, 0.995]
    with pytest.raises(exp_runs.FrontierError, match="no complete result"):
        fsearch.search(lambda rs: [], [], ["kd"], [1.0], 2, 200, 1.05, 8, log=lambda m: None)


def test_censored_frontiers_and_nan_is_a_failure():
    flat = [fake_probe(r, [0, 1]) for r in (0.5, 0.6)]  # within every budget: the frontier is beyond the range
    f = fsearch.frontier(flat, "kd", 2.0)
    assert f.censored == ">=" and f.estimate == flat[-1].compression and freport.describe(f).startswith(">= ")
    bad = fake_probe(0.5, [0, 1])
    bad.acc["kd"] = np.array([float("nan"), 93.0])
    f = fsearch.frontier([bad, fake_probe(0.6, [0, 1])], "kd", 1.0)
    assert f.censored == "<" and freport.describe(f).startswith("< ")  # a NaN mean never passes


def test_bootstrap_bracket_is_seeded_and_widens_with_noise():
    def probes(noise):
        out = []
        for r in (0.9, 0.95, 0.98):
            p = fake_probe(r, list(range(6)))
            p.acc["kd"] = p.acc["kd"] + noise * np.array([1, -1, 2, -2, 0.5, -0.5])
            out.append(p)
        return out
    quiet, loud = fsearch.frontier(probes(0.01), "kd", 1.0), fsearch.frontier(probes(1.0), "kd", 1.0)
    assert fsearch.frontier(probes(1.0), "kd", 1.0).interval == loud.interval  # deterministic
    assert loud.interval[1] - loud.interval[0] > quiet.interval[1] - quiet.interval[0]


def test_each_run_is_judged_against_its_own_teacher():
    probes = [fake_probe(r, [0, 1, 2]) for r in (0.5, 0.8, 0.9, 0.95, 0.98)]
    base = {b: fsearch.frontier(probes, "kd", b) for b in (0.5, 1.0)}
    # the 0.95 probe's seeds 0 and 2 ran on another CPU: teachers 0.4 pt better, and their students with them
    shift = np.array([0.4, 0.0, 0.4])
    probes[3].teacher = probes[3].teacher + shift
    probes[3].acc = {m: a + shift for m, a in probes[3].acc.items()}
    for b, f0 in base.items():  # the frontier 5 * e^sqrt(b / 0.5) (13.6x, 20.6x) is bracketed by the 0.95 probe
        f = fsearch.frontier(probes, "kd", b)
        assert f.estimate == pytest.approx(f0.estimate) and f.interval == pytest.approx(f0.interval)
        assert (f.lo.ratio, f.hi.ratio) == (f0.lo.ratio, f0.hi.ratio)
    assert "by up to 0.32 pt" in freport.markdown(probes, [fsearch.frontier(probes, "kd", 1.0)], ["kd"], [1.0], "t")
    assert "each seed had one teacher at every probe" in freport.markdown(probes[:3], [], ["kd"], [1.0], "t")


def test_probes_show_the_paired_gap_between_methods_with_its_interval():
    probe = fsearch.Probe(0.9, [0, 1, 2], {"kd": np.array([91.0, 92.0, 93.0]), "finetune": np.array([90.5, 91.0, 93.3])},
                    np.full(3, TEACHER), 10.0, 1.0, ["a", "b", "c"])
    # differences +0.5, +1.0, -0.3: mean 0.4, sd 0.6557, t(0.975, 2) = 4.3027 -> half-width 1.6289
    row = freport.probe_table([probe], ["kd", "finetune"]).iloc[0]
    assert row["kd_minus_finetune"] == pytest.approx(0.4, abs=1e-3)
    assert (row["kd_minus_finetune_ci95_low"], row["kd_minus_finetune_ci95_high"]) == pytest.approx(
        (0.4 - 1.629, 0.4 + 1.629), abs=2e-3)
    md = freport.markdown([probe], [], ["kd", "finetune"], [1.0], "t")
    assert "| kd − finetune (95 % CI) | n |" in md and "| +0.40 [-1.23, +2.03] | 3 |" in md
    assert "−" not in freport.markdown([probe], [], ["kd"], [1.0], "t").split("Every probe")[1]  # one method: no gap
    one = fsearch.Probe(0.9, [0], {"kd": np.array([91.0]), "finetune": np.array([90.0])}, np.full(1, TEACHER), 10.0, 1.0,
                  ["a"])
    assert "| +1.00 | 1 |" in freport.markdown([one], [], ["kd", "finetune"], [1.0], "t")  # no interval from one seed


@pytest.mark.parametrize("logged,target,same", [
    ("0.05", 0.05, True), ("5", 5, True), ("2.0", 2, True), ("2", 2.0, True), ("0.5", 0.05, False),
    ("None", None, True), ("True", True, True), ("False", True, False), ("['kd', 'finetune']", ["kd", "finetune"], True),
    ("[0.1, 1]", [0.1, 1.0], True), ("{}", {}, True), ("magnitude", "magnitude", True), ("__import__('os')", [1], False),
])
def test_same_value_compares_logged_strings_with_yaml_values(logged, target, same):
    assert exp_runs.same_value(logged, target) is same


# ----------------------------------------------------------------------------- the CLI, with a fake queue
def run_row(params: dict, ratio: float, seed: int, t: int) -> dict:
    flat = {**flatten(params), "prune.ratio": ratio, "seed": seed}
    c = 1 / (1 - ratio)
    row = {"run_id": f"fake{t:04d}", "status": "FINISHED", "start_time": str(t), "dvc_exp_name": f"e{t}"}
    row.update({f"params.{k}": str(v) for k, v in flat.items()})
    row.update(acc_teacher=TEACHER, acc_pruned=50.0, compression_ratio=c * 0.98, prunable_compression_ratio=c,
               mac_reduction=c * 0.9, **{f"acc_{m}": fake_acc(m, c, seed) for m in SLOPE})
    return row


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    params = default_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh.db'}")
    return tmp_path, params


def fake_queue(monkeypatch, params, records, calls):
    def run_grid(grid, extra, jobs, prefix, experiment, log=print):
        calls.append(sorted(grid))
        assert "-S" in extra and "distill.variants=['kd','finetune']" in extra and "distill.epochs=3" in extra
        old = pd.read_csv(records, dtype=str, keep_default_na=False) if records.exists() else pd.DataFrame()
        p = exp_args.nest({**flatten(params), "distill.epochs": 3, "distill.variants": ["kd", "finetune"]})
        new = pd.DataFrame([run_row(p, r, s, len(old) + i) for i, (s, r) in enumerate(grid)])
        pd.concat([old, new.astype(str)]).to_csv(records, index=False)
        return {g: f"n{i}" for i, g in enumerate(grid)}, {}, {}, 0.0
    monkeypatch.setattr(exp_queue, "run_grid", run_grid)


def test_cli_searches_then_resumes_from_the_records_alone(workdir, monkeypatch, capsys):
    tmp, params = workdir
    records = tmp / "metrics" / "frontier_runs.csv"
    records.parent.mkdir()
    calls: list = []
    fake_queue(monkeypatch, params, records, calls)
    args = ["--budget", "0.5,1", "--seeds", "0,1", "--set", "distill.epochs=3", "--lo", "4", "--hi", "64",
            "--tolerance", "1.3", "--no-mlflow-summary"]
    assert F.main(args + ["--max-probes", "3"]) == 0  # stops early: the ends and one midpoint
    assert calls[0] == [(0, 0.75), (0, 0.9844), (1, 0.75), (1, 0.9844)] and len(calls) == 2
    first = {tuple(c) for batch in calls for c in batch}
    # a fresh machine: an empty MLflow store; only the committed records are left
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'other.db'}")
    assert F.main(args + ["--max-probes", "30"]) == 0
    later = [tuple(c) for batch in calls[2:] for c in batch]
    assert later and not set(later) & first  # nothing trained twice
    out = capsys.readouterr().out
    assert "every bracket is within 1.3x" in out and "within 0.5 pt of the teacher (93.00 %): kd reaches" in out
    table = (tmp / "metrics" / "frontier.csv").read_text()
    assert "kd_mean" in table and "fake0000" in table
    points = pd.read_csv(tmp / "metrics" / "frontier_points.csv")
    assert len(points) == 4 and set(points["method"]) == {"kd", "finetune"} and set(points["budget"]) == {0.5, 1.0}
    kd1 = points[(points.method == "kd") & (points.budget == 1.0)].iloc[0]
    assert kd1.ci95_low <= kd1.frontier <= kd1.ci95_high and abs(math.log(kd1.frontier / exact_frontier("kd", 1.0))) < 0.3 and (tmp / "plots" / "frontier.png").stat().st_size > 1000
    md = (tmp / "metrics" / "frontier.md").read_text()
    assert "| 1 | kd |" in md and "bootstrap" in md
    n_calls = len(calls)
    assert F.main(args + ["--analyse"]) == 0 and len(calls) == n_calls  # --analyse trains nothing
    # the records hold every run once
    rec = pd.read_csv(records, dtype=str)
    assert rec["run_id"].is_unique and len(rec) == 2 * len({r for b in calls for _, r in b})


def test_runs_with_other_params_are_not_probes(workdir, monkeypatch):
    tmp, params = workdir
    records = tmp / "metrics" / "frontier_runs.csv"
    records.parent.mkdir()
    other = exp_args.nest({**flatten(params), "distill.epochs": 1, "distill.variants": ["kd", "finetune"]})
    pd.DataFrame([run_row(other, r, s, i) for i, (s, r) in enumerate([(0, 0.75), (1, 0.75)])]).to_csv(records, index=False)
    runs = exp_runs.read_records(records)
    _, target = F.target_params(tmp / "params.yaml", {"distill.epochs": 3}, ["kd", "finetune"])
    assert exp_runs.matching(runs, target, ["kd", "finetune"]).empty
    _, target = F.target_params(tmp / "params.yaml", {"distill.epochs": 1}, ["kd", "finetune"])
    assert len(fsearch.probes_from_runs(exp_runs.matching(runs, target, ["kd", "finetune"]), ["kd", "finetune"], [0, 1])) == 1
    assert fsearch.probes_from_runs(exp_runs.matching(runs, target, ["kd", "finetune"]), ["kd", "finetune"], [0, 1, 2]) == []
    assert exp_runs.matching(runs, target, ["kd", "scratch"]).empty  # a method the runs did not train


def test_runs_from_before_a_param_existed_ran_with_its_default(workdir, monkeypatch):
    """A param added after some runs (here prune.agp_end plays it): they have no such column (MLflow) or an
    empty cell (the records CSV once newer runs are in it). They count as runs at the default (0.5), and only
    there, so a resumed study does not train them again and a run at another value is never mistaken."""
    tmp, params = workdir
    records = tmp / "metrics" / "frontier_runs.csv"
    records.parent.mkdir()
    old = exp_args.nest({**flatten(params), "distill.variants": ["kd", "finetune"]})
    rows = pd.DataFrame([run_row(old, 0.75, s, s) for s in (0, 1)]).drop(columns="params.prune.agp_end")
    rows.to_csv(records, index=False)
    runs = exp_runs.read_records(records)
    _, target = F.target_params(tmp / "params.yaml", {}, ["kd", "finetune"])
    assert target["prune.agp_end"] == 0.5 and "params.prune.agp_end" not in runs
    assert len(exp_runs.matching(runs, target, ["kd", "finetune"])) == 2
    _, other = F.target_params(tmp / "params.yaml", {"prune.agp_end": 0.25}, ["kd", "finetune"])
    assert exp_runs.matching(runs, other, ["kd", "finetune"]).empty
    # a newer run at 0.25 joins the file: the old rows' cells are now empty, and still mean the default
    new = exp_args.nest({**flatten(params), "distill.variants": ["kd", "finetune"], "prune.agp_end": 0.25})
    pd.concat([rows, pd.DataFrame([run_row(new, 0.75, 0, 9)])], ignore_index=True).to_csv(records, index=False)
    runs = exp_runs.read_records(records)
    assert list(exp_runs.matching(runs, target, ["kd", "finetune"])["run_id"]) == ["fake0000", "fake0001"]
    assert list(exp_runs.matching(runs, other, ["kd", "finetune"])["run_id"]) == ["fake0009"]
    # a key kdprune does not know has no default: a run without it never matches one
    assert not exp_runs.param_matches(runs, "prune.not_a_param", 0.0).any()


def test_a_method_without_kd_joins_from_a_run_at_other_kd_settings_of_the_same_teacher(workdir):
    """kd alone at alpha 0.5 (seeds 0-2) next to kd + finetune at alpha 0.9: each probe takes kd from the
    alpha 0.5 run and finetune from the alpha 0.9 run of the same seed and ratio, only when their teacher and
    compression agree; a run holding both methods at the target is preferred; kd is never borrowed."""
    tmp, params = workdir
    core = exp_args.nest({**flatten(params), "distill.variants": ["kd", "finetune"], "distill.alpha": 0.9})
    chosen = exp_args.nest({**flatten(params), "distill.variants": ["kd"], "distill.alpha": 0.5})
    both = exp_args.nest({**flatten(params), "distill.variants": ["kd", "finetune"], "distill.alpha": 0.5})
    rows = [run_row(core, 0.75, s, s) for s in (0, 1, 2)]
    for s in (0, 1, 2):
        r = run_row(chosen, 0.75, s, 10 + s)
        r.pop("acc_finetune")
        r["acc_kd"] = 50.0 + s
        rows.append(r)
    rows[2]["acc_teacher"] = TEACHER - 1  # seed 2's core run: another teacher (other code or data)
    rows.append({**run_row(both, 0.9, 0, 20), "acc_kd": 60.0, "acc_finetune": 61.0})  # one run with both
    rows.append({**run_row(core, 0.9, 0, 21), "acc_finetune": 99.0})  # newer, but the joined one loses
    runs = pd.DataFrame(rows)
    _, target = F.target_params(tmp / "params.yaml", {"distill.alpha": 0.5}, ["kd", "finetune"])
    assert exp_runs.matching(runs, target, ["kd", "finetune"])["run_id"].tolist() == ["fake0020"]
    j = exp_runs.joined(runs, target, ["kd", "finetune"])
    got = {(r.ratio, r.seed): (r.run_id, r.acc_kd, r.acc_finetune) for r in j.itertuples()}
    assert got == {(0.75, 0): ("fake0010+fake0000", 50.0, fake_acc("finetune", 4, 0)),
                   (0.75, 1): ("fake0011+fake0001", 51.0, fake_acc("finetune", 4, 1)),
                   (0.9, 0): ("fake0020", 60.0, 61.0)}  # seed 2 at 0.75: teachers differ, not joined
    probes = fsearch.probes_from_runs(j, ["kd", "finetune"], [0, 1])
    assert [p.ratio for p in probes] == [0.75] and probes[0].acc["kd"].tolist() == [50.0, 51.0]
    # the other way round: kd at alpha 0.9 is never taken from the alpha 0.5 runs
    _, core_target = F.target_params(tmp / "params.yaml", {"distill.alpha": 0.9}, ["kd", "finetune"])
    assert set(exp_runs.joined(runs, core_target, ["kd", "finetune"])["run_id"]) == {"fake0000", "fake0001", "fake0002",
                                                                              "fake0021"}


def test_the_methods_without_kd_are_the_variants_that_do_not_distil():
    from kdprune.train.recovery import VARIANTS

    assert exp_runs.WITHOUT_KD == {name for name, v in VARIANTS.items() if not v.kd}
    assert exp_runs.KD_KEYS <= set(flatten(default_params()))


@pytest.mark.parametrize("argv,message", [
    (["--budget", "-1"], "--budget -1.0 is out of range"),
    (["--budget", "nan"], "--budget nan is out of range"),
    (["--budget", "1;rm"], "not a comma-separated list of numbers"),
    (["--seeds", "0,0"], "distinct"),
    (["--seeds", "-1"], "--seeds '-1'"),
    (["--seeds", "4294967296"], "[0, 2^32)"),
    (["--methods", "kd,kd$(touch x)"], "--methods"),
    (["--lo", "10", "--hi", "5"], "--hi 5.0 is out of range"),
    (["--tolerance", "0.5"], "--tolerance 0.5 is out of range"),
    (["--max-probes", "1000"], "--max-probes 1000"),
    (["-j", "0"], "-j 0"),
    (["--set", "prune.ratio=0.5"], "--set prune.ratio: the search sets it"),
    (["--set", "teacher.lr=1e30"], "teacher.lr"),
    (["--set", "teacher.typo=1"], "typo"),
    (["--set", "noequals"], "use key=value"),
    (["--set", "distill.epochs=*a"], "--set distill.epochs: cannot read the value"),
    (["--set", "prune.method=channel", "--set", "prune.target_macs_reduction=2.0"], "prune.target_macs_reduction"),
])
def test_cli_errors_name_the_option(workdir, argv, message, capsys):
    assert F.main(argv + ["--analyse", "--no-mlflow-summary"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_structured_pruning_is_searched_on_the_channel_ratio(workdir, monkeypatch, capsys):
    """l1_filter / channel: the same search, on the channel ratio; the table reports params and MAC compression."""
    tmp, params = workdir
    records = tmp / "metrics" / "frontier_runs.csv"
    records.parent.mkdir()
    calls: list = []

    def run_grid(grid, extra, jobs, prefix, experiment, log=print):
        calls.append(grid)
        assert "prune.method='l1_filter'" in extra
        p = exp_args.nest({**flatten(params), "prune.method": "l1_filter", "distill.variants": ["kd", "finetune"]})
        old = pd.read_csv(records, dtype=str, keep_default_na=False) if records.exists() else pd.DataFrame()
        rows = []
        for i, (s, r) in enumerate(grid):
            row = run_row(p, r, s, len(old) + i)
            row.update(compression_ratio=1 / (1 - r) ** 2, mac_reduction=1 / (1 - r) ** 2 * 1.05)  # channels: ~square
            rows.append(row)
        pd.concat([old, pd.DataFrame(rows).astype(str)]).to_csv(records, index=False)
        return {}, {}, {}, 0.0
    monkeypatch.setattr(exp_queue, "run_grid", run_grid)
    assert F.main(["--set", "prune.method=l1_filter", "--seeds", "0,1", "--lo", "2", "--hi", "16", "--max-probes", "6",
                   "--no-mlflow-summary"]) == 0
    md = (tmp / "metrics" / "frontier.md").read_text()
    assert "| 0.5 | 4.0x | 4.20x |" in md and "| 0.9375 | 256x | 268.80x |" in md  # params and MACs, both measured
    assert calls[0] == [(0, 0.5), (0, 0.9375), (1, 0.5), (1, 0.9375)]


def old_structured_probe(ratio: float, seeds: list[int]) -> fsearch.Probe:
    """l1_filter / channel before issue 27: ResNet-8 w16's 16-channel layers were left whole above ratio 0.9375
    (Torch-Pruning keeps int(16 x (1 - ratio)) = 0 channels, so none are removed) and nothing was pruned at 0.99."""
    p = fake_probe(ratio, seeds)
    p.compression = p.mac_reduction = 1 / (1 - ratio) ** 2 if ratio <= 0.9375 else 1.0
    return p


def test_a_structured_search_refuses_probes_whose_compression_does_not_grow():
    store: dict[float, fsearch.Probe] = {}

    def run(ratios):
        store.update({r: old_structured_probe(r, [0, 1]) for r in ratios})
        return sorted(store.values(), key=lambda p: p.ratio)

    for method in ("l1_filter", "channel"):
        store.clear()
        with pytest.raises(exp_runs.FrontierError) as e:
            fsearch.search(run, [], ["kd"], [1.0], 2, 200, 1.05, 8, log=lambda m: None, prune_method=method)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and msg.startswith(
            f"prune.method {method}: compression does not grow with prune.ratio: the probe at ratio 0.995 compressed "
            "1.00x, the one at ratio 0.5 4.00x;") and "runs of ratio 0.995: run-0.995-0, run-0.995-1;" in msg, msg
        assert sorted(store) == [0.5, 0.995]  # refused after the first round: no probe was bisected on a wrong axis
    # equal compression at a higher ratio is refused too; probes that already disagree are refused before any run
    flat = [old_structured_probe(r, [0, 1]) for r in (0.5, 0.96, 0.99)]
    with pytest.raises(exp_runs.FrontierError, match="probe at ratio 0.99 compressed 1.00x, the one at ratio 0.96 1.00x"):
        fsearch.check_compression_grows(flat[1:], "channel")
    with pytest.raises(exp_runs.FrontierError, match="ratio 0.96 compressed 1.00x, the one at ratio 0.5 4.00x"):
        fsearch.search(lambda rs: pytest.fail("ran a probe"), flat, ["kd"], [1.0], 2, 200, 1.05, 8,
                       log=lambda m: None, prune_method="l1_filter")
    fsearch.check_compression_grows(flat, "magnitude")  # magnitude's axis is its compression: not checked
    fsearch.check_compression_grows([old_structured_probe(r, [0]) for r in (0.5, 0.9, 0.9375)], "l1_filter")


def test_the_frontier_cli_refuses_structured_runs_whose_compression_does_not_grow(workdir, capsys):
    tmp, params = workdir
    records = tmp / "metrics" / "frontier_runs.csv"
    records.parent.mkdir()
    p = exp_args.nest({**flatten(params), "prune.method": "channel", "distill.variants": ["kd", "finetune"]})
    rows = []
    for i, (s, r) in enumerate([(0, 0.5), (1, 0.5), (0, 0.99), (1, 0.99)]):
        rows.append({**run_row(p, r, s, i), "compression_ratio": 100.0 if r == 0.5 else 1.0})
    pd.DataFrame(rows).to_csv(records, index=False)
    assert F.main(["--set", "prune.method=channel", "--seeds", "0,1", "--analyse", "--no-mlflow-summary"]) == 2
    err = capsys.readouterr().err  # MLflow's own INFO lines (creating the store) come first
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err and errors[0].startswith(
        "error: prune.method channel: compression does not grow with prune.ratio: the probe at ratio 0.99 compressed "
        "1.00x, the one at ratio 0.5 100.00x;") and "fake0002, fake0003" in errors[0], err
    assert not (tmp / "metrics" / "frontier.md").exists()


def test_a_corrupt_records_file_is_named(workdir, capsys):
    tmp, _ = workdir
    bad = tmp / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage\n\x00\x01")
    assert F.main(["--analyse", "--records", str(bad), "--no-mlflow-summary"]) == 2
    assert str(bad) in capsys.readouterr().err


@pytest.mark.parametrize("column, value, rule", [
    ("acc_kd", "250", "an accuracy in [0, 100] %"), ("acc_finetune", "-1", "an accuracy in [0, 100] %"),
    ("acc_teacher", "inf", "an accuracy in [0, 100] %"), ("compression_ratio", "0.5", "a finite compression >= 1"),
    ("prunable_compression_ratio", "inf", "a finite compression >= 1"), ("acc_pruned", "1e308", "an accuracy")])
def test_impossible_metrics_in_a_records_file_are_refused(workdir, capsys, column, value, rule):
    """Old: a records row with acc_kd = 250 (or inf) from someone else's file moved the frontier."""
    tmp, params = workdir
    rows = [run_row(params, r, 0, i) for i, r in enumerate((0.5, 0.9))]
    rows[1][column] = value
    records = tmp / "r.csv"
    pd.DataFrame(rows).astype(str).to_csv(records, index=False)
    assert F.main(["--analyse", "--records", str(records), "--no-mlflow-summary"]) == 2
    err = capsys.readouterr().err
    assert str(records) in err and "run fake0001" in err and f"{column} = " in err and rule in err, err
    rows[1][column] = "nan"  # a missing value is a failed run, not an error
    pd.DataFrame(rows).astype(str).to_csv(records, index=False)
    assert not exp_runs.read_records(records).empty


def test_an_oversized_records_file_is_refused_before_reading(workdir, capsys):
    tmp, _ = workdir
    big = tmp / "big.csv"
    with open(big, "wb") as f:  # sparse: no disk used
        f.truncate(exp_runs.MAX_RECORDS_BYTES + 1)
    assert F.main(["--analyse", "--records", str(big), "--no-mlflow-summary"]) == 2
    assert "a records CSV is at most" in capsys.readouterr().err


def test_no_matching_runs_is_a_clear_error(workdir, capsys):
    assert F.main(["--analyse", "--no-mlflow-summary"]) == 2
    assert "no finished probes match params.yaml" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a tiny real search
def test_tiny_real_search_through_the_dvc_queue_then_resume_trains_nothing(tmp_path, venv_bin):
    from tests.pipeline.test_e2e import git, make_repo

    repo, env = make_repo(tmp_path, venv_bin)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["teacher"]["epochs"] = 1
    params["evaluate"]["latency_repeats"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-qm", "tiny")
    cmd = [str(venv_bin / "python"), "-m", "kdprune.frontier", "--budget", "50", "--seeds", "0", "--lo", "2",
           "--hi", "4", "--tolerance", "10"]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "frontier: probing ratios 0.5, 0.75" in r.stdout and "failed: none" in r.stdout
    assert "within 50 pt of the teacher" in r.stdout and "mlflow: frontier logged as run" in r.stdout
    rec = pd.read_csv(repo / "metrics" / "frontier_runs.csv", dtype=str)
    assert sorted(rec["params.prune.ratio"]) == ["0.5", "0.75"] and rec["run_id"].is_unique
    assert (repo / "plots" / "frontier.png").exists()
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "probing" not in r.stdout and "2 finished probes found" in r.stdout, r.stdout
    assert len(pd.read_csv(repo / "metrics" / "frontier_runs.csv", dtype=str)) == 2


def test_a_busy_queue_is_refused_before_anything_is_queued(monkeypatch):
    """Stale 'Running' entries of a stopped part (or someone else's experiments) would make the wait hang."""
    queued = []
    monkeypatch.setattr(exp_queue, "queue_status", lambda: [{"name": "study-core-r0p98-s1-17", "status": "Running"}])
    monkeypatch.setattr(exp_queue, "dvc", lambda *a, **k: queued.append(a))
    with pytest.raises(SystemExit, match="already holds 1 queued or running experiment.*study-core-r0p98-s1-17"):
        exp_queue.run_grid([(0, 0.9)], [], 1, "frontier", "kdprune")
    assert queued == []
