"""CSV formula injection: a run name or id from a records file (or a DVC experiment name) that begins with
=, +, -, @, a tab or a carriage return reaches every CSV the tools write escaped with a leading ', numbers stay
numbers, and the records read back exactly as they were."""
import csv
from pathlib import Path

import pandas as pd
import pytest

from kdprune import io
from kdprune.experiments import compare, report
from kdprune.experiments import frontier as F
from kdprune.experiments import runs as exp_runs
from tests.experiments.test_frontier import run_row, workdir  # noqa: F401 - a fixture

HOSTILE_NAME = '=HYPERLINK("http://x")'
HOSTILE_ID = "@SUM(1)"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cells(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return [c for row in csv.reader(fh) for c in row]


def assert_no_formula(path: Path) -> None:
    for c in cells(path):
        assert not c.startswith(FORMULA_START) or io._CSV_NUMBER.fullmatch(c), (path.name, c)


@pytest.mark.parametrize("value, escaped", [
    ("=1+1", "'=1+1"), ("+cmd", "'+cmd"), ("-cmd", "'-cmd"), ("@SUM(1)", "'@SUM(1)"), ("\tx", "'\tx"),
    ("\rx", "'\rx"), ("'=x", "''=x"), ("-0.61", "-0.61"), ("+1e5", "+1e5"), ("-inf", "'-inf"), ("abc", "abc"),
    ("'abc", "'abc"), ("", ""), (-0.61, -0.61), (None, None)])
def test_csv_safe_escapes_formulas_only_and_round_trips(value, escaped):
    assert io.csv_safe(value) == escaped
    assert io.csv_unescape(io.csv_safe(value)) == value


def test_csv_text_escapes_text_cells_and_names_never_numbers():
    df = pd.DataFrame({"gap": [-0.61, 1.5], "n": [-3, 2], "run_ids": ["@a b", "c"], "=name": ["-0.61", "-x"]})
    assert exp_runs.csv_text(df) == "gap,n,run_ids,'=name\n-0.61,-3,'@a b,-0.61\n1.5,2,c,'-x\n"


def hostile_records(params, path: Path) -> None:
    rows = [run_row(params, r, s, i) for i, (r, s) in enumerate((r, s) for r in (0.5, 0.9) for s in (0, 1))]
    rows[0].update(run_id=HOSTILE_ID, run_name=HOSTILE_NAME, dvc_exp_name="-exp")
    rows[1].update(run_name="+1 or -0.61 is text")
    pd.DataFrame(rows).astype(str).to_csv(path, index=False)


def test_every_csv_written_from_a_hostile_records_file_is_escaped(workdir, capsys):  # noqa: F811
    tmp, params = workdir
    records = tmp / "metrics" / "frontier_runs.csv"
    records.parent.mkdir()
    hostile_records(params, records)
    before = exp_runs.read_records(records)
    assert before["run_id"].iloc[0] == HOSTILE_ID and before["run_name"].iloc[0] == HOSTILE_NAME

    # the frontier rewrites the records (runs.write_records) and writes frontier.csv, frontier_points.csv
    assert F.main(["--analyse", "--seeds", "0,1", "--no-mlflow-summary"]) == 0
    probes = (tmp / "metrics" / "frontier.csv").read_text()
    assert f"'{HOSTILE_ID} fake0001" in probes
    rewritten = records.read_text()
    assert f"'{HOSTILE_ID}," in rewritten and f"'{HOSTILE_NAME}".replace('"', '""') in rewritten
    assert "'-exp" in rewritten and "'+1 or -0.61 is text" in rewritten
    # ... and it reads back exactly as the original file did: the escaping round-trips
    pd.testing.assert_frame_equal(exp_runs.read_records(records), exp_runs.runs_table(before))

    # the report: report.csv (run_ids) and report_runs.csv (every run)
    assert report.main(["--records", str(records), "--no-mlflow-summary"]) == 0
    runs = (tmp / "metrics" / "report_runs.csv").read_text()
    assert f"'{HOSTILE_ID}," in runs and f"'{HOSTILE_NAME}".replace('"', '""') in runs
    assert f"'{HOSTILE_ID} fake0001" in (tmp / "metrics" / "report.csv").read_text()
    for name in ("frontier.csv", "frontier_points.csv", "frontier_runs.csv", "report.csv", "report_runs.csv"):
        assert_no_formula(tmp / "metrics" / name)
    capsys.readouterr()


def test_the_committed_study_records_read_back_unchanged_after_a_rewrite(tmp_path):
    committed = Path(__file__).resolve().parents[2] / "metrics" / "study_runs.csv"
    runs = exp_runs.read_records(committed)
    exp_runs.write_records(tmp_path / "r.csv", runs)
    pd.testing.assert_frame_equal(exp_runs.read_records(tmp_path / "r.csv"), exp_runs.runs_table(runs))


def test_compare_csv_escapes_experiment_names_and_params():
    rows = [{"experiment": HOSTILE_NAME, "method": "magnitude", "ratio": 0.9, "data": "@evil", "seed": 0,
             "compression_ratio": 10.0, "acc_teacher": 92.5, "acc_kd": -0.5},
            {"experiment": "ok", "method": "-x", "ratio": 0.5, "data": "fashion", "seed": 1}]
    text = compare.render(rows, as_csv=True)
    got = list(csv.reader(text.splitlines()))
    assert got[1][0] == "'" + HOSTILE_NAME and "'@evil" in got[1] and "-0.5" in got[1] and "'-x" in got[2]
    assert [io.csv_unescape(c) for c in got[1][:2]] == [HOSTILE_NAME, "magnitude"]
    # the markdown table is for reading, not a spreadsheet: unchanged
    assert f"| {HOSTILE_NAME} | magnitude |" in compare.render(rows)
