"""Same params and seed on CPU -> identical dvc.lock output hashes across two fresh `dvc repro` runs,
in two repos at different paths reading the same data bytes from different directories."""
import shutil
import subprocess

import yaml

from tests.pipeline.test_e2e import make_repo


def out_hashes(repo) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {f"{stage}:{o['path']}": o["md5"] for stage, s in lock["stages"].items() for o in s.get("outs", [])}


def test_two_fresh_repros_give_identical_output_hashes(tmp_path, venv_bin):
    procs = []
    (tmp_path / "run0").mkdir()
    first, env = make_repo(tmp_path / "run0", venv_bin)
    # the second repo: a clone of the first (the same commit, which the ONNX exports name), reading a copy of
    # the raw data from another directory
    shutil.copytree(tmp_path / "run0" / "raw", tmp_path / "run1" / "raw")
    subprocess.run(["git", "clone", "-q", str(first), str(tmp_path / "run1" / "repo")], env=env, check=True)
    for i in range(2):
        repo = tmp_path / f"run{i}" / "repo"
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["data"]["root"] = str(tmp_path / f"run{i}" / "raw")
        params["mlflow"]["enabled"] = False  # tracking has no outputs; keep the test fast
        params["teacher"]["epochs"] = 1
        params["runtime"]["threads"] = 1  # the two runs go in parallel on a shared machine
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        procs.append((repo, subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True)))
    hashes = []
    for repo, proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        hashes.append(out_hashes(repo))
    expected = {"prepare:data/prepared/dataset.pt", "train_teacher:models/teacher.pt",
                "train_teacher:metrics/teacher.json", "prune:models/pruned.pt", "prune:metrics/prune.json",
                "distill:models/students", "distill:metrics/distill", "validate:data/params.valid",
                "evaluate:metrics/evaluate.json", "evaluate:plots/accuracy.png", "evaluate:models/export",
                "train_teacher:plots/teacher.csv", "distill:plots/distill", "evaluate:plots/compression.json"}
    assert expected <= set(hashes[0]), sorted(hashes[0])
    assert not any("latency" in k for k in hashes[0])  # wall-clock timings are not DVC outputs (logs/)
    diff = {k: (v, hashes[1].get(k)) for k, v in hashes[0].items() if hashes[1].get(k) != v}
    assert not diff, f"outputs differ between two runs with the same params and seed: {diff}"

    # a clean tree after `dvc repro` of a committed result: every committed file (metrics/, plots/, dvc.lock's
    # hashes) comes out byte-identical, and the timings that differ go to git-ignored logs/
    (run0, _), (run1, _) = procs
    committed = [{str(f.relative_to(r)): f.read_bytes() for d in ("metrics", "plots") for f in sorted((r / d).rglob("*"))
                  if f.is_file()} for r in (run0, run1)]
    assert committed[0].keys() == committed[1].keys() and "metrics/evaluate.json" in committed[0]
    assert [k for k in committed[0] if committed[0][k] != committed[1][k]] == []
    assert (run0 / "logs" / "latency.json").exists()
    r = subprocess.run(["git", "check-ignore", "-q", "logs/latency.json"], cwd=run0)
    assert r.returncode == 0, "logs/ must be git-ignored"
