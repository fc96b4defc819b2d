"""dvc.yaml against the code: no param reaches a shell, validation runs first, and every stage lists the
code it imports."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
GATE = "data/params.valid"
MODEL_CODE = "data/model_code.sha256"  # the custom model's module hash, written by validate


def module_files(name: str) -> list[str]:
    """The repository files that ``import name`` runs: each package's ``__init__.py`` below ``kdprune`` (importing
    ``kdprune.models.zoo`` runs ``kdprune/models/__init__.py`` first) and the module itself."""
    parts, files = name.split("."), []
    for i in range(2, len(parts) + 1):
        mod = "/".join(parts[:i])
        if (ROOT / f"{mod}.py").exists():
            files.append(f"{mod}.py")
        elif (ROOT / mod / "__init__.py").exists():
            files.append(f"{mod}/__init__.py")
    return files


def module_imports(path: Path, seen: set[str] | None = None) -> set[str]:
    """kdprune modules that ``path`` imports anywhere in the file (at module level or inside a function),
    transitively, as repository paths. ``from kdprune.models import zoo`` is the module kdprune/models/zoo.py;
    ``from kdprune.models import build_model`` is the package's kdprune/models/__init__.py."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "kdprune" or node.module.startswith("kdprune.")):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("kdprune.")]
        for name in names:
            for rel in module_files(name):
                if rel not in seen:
                    seen.add(rel)
                    module_imports(ROOT / rel, seen)
    return seen


def package_files(folder: str) -> set[str]:
    return {str(f.relative_to(ROOT)) for f in (ROOT / folder).rglob("*.py") if "__pycache__" not in f.parts}


def expected_code_deps(files: set[str]) -> set[str]:
    """What a stage lists for the code ``files`` it runs: a package folder of kdprune (``kdprune/data``) where the
    stage runs most (at least half) of that folder's modules, the single files otherwise."""
    deps = set(files)
    for folder in sorted({str(Path(f).parent) for f in files if Path(f).parent != Path("kdprune")
                          and f.startswith("kdprune/")}):
        inside = package_files(folder)
        used = files & inside
        if 2 * len(used) >= len(inside):
            deps = (deps - inside) | {folder}
    return deps


def code_deps(st: dict) -> set[str]:
    return {d for d in st["deps"] if d.endswith(".py") or (ROOT / d / "__init__.py").exists()}


def test_no_command_interpolates_anything():
    """DVC pastes ${...} values into the shell command before kdprune.params has seen them."""
    text = "\n".join(line.split("#")[0] for line in (ROOT / "dvc.yaml").read_text().splitlines())  # no comments
    assert "${" not in text and "foreach" not in text and "matrix" not in text
    for name, st in PIPELINE.items():
        assert re.fullmatch(r"python -m stages\.\w+", st["cmd"]), (name, st["cmd"])


def test_validate_runs_first_and_gates_every_stage():
    validate = PIPELINE["validate"]
    assert validate["params"] == [{"params.yaml": None}]  # every key of params.yaml
    assert validate["outs"] == [{GATE: {"persist": True}}, {MODEL_CODE: {"persist": True}}]  # kept when it fails
    for name, st in PIPELINE.items():
        if name != "validate":
            assert GATE in st["deps"], f"stage {name} does not wait for params validation"


def test_every_stage_that_builds_the_model_depends_on_its_code():
    """model.factory's module can be any file of the repository: validate hashes it on every run (always_changed)
    into MODEL_CODE, and each stage that builds or loads the model depends on that file."""
    assert PIPELINE["validate"].get("always_changed") is True
    builds = {name for name in PIPELINE if re.search(r"build_model|load_model", (ROOT / f"stages/{name}.py").read_text())}
    assert builds == {"train_teacher", "prune", "distill", "evaluate"}
    for name, st in PIPELINE.items():
        assert (MODEL_CODE in st.get("deps", [])) == (name in builds), name


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_stage_deps_list_exactly_the_code_it_imports(name):
    script = f"stages/{name}.py"
    # `python -m stages.X` runs stages/__init__.py first (the venv check)
    package = {"stages/__init__.py"} | module_imports(ROOT / "stages/__init__.py")
    runs = {script} | package | module_imports(ROOT / script)
    assert code_deps(PIPELINE[name]) == expected_code_deps(runs)


def test_a_folder_dependency_covers_every_file_of_it_and_pycache_is_ignored():
    """A folder dependency hashes every file in it: DVC must not see __pycache__ (which differs between
    machines and Python versions) or a fresh clone would find every stage changed."""
    assert "__pycache__" in (ROOT / ".dvcignore").read_text()
    folders = {d for st in PIPELINE.values() for d in code_deps(st) if not d.endswith(".py")}
    assert folders, "no stage depends on a package folder"
    for folder in folders:
        assert expected_code_deps(package_files(folder)) == {folder}


def test_imports_inside_functions_are_followed(tmp_path):
    """An import inside a function runs code too: the graph follows it."""
    (tmp_path / "s.py").write_text("def main():\n    from kdprune import checkpoint\n")
    assert "kdprune/checkpoint.py" in module_imports(tmp_path / "s.py")


def test_each_stage_lists_each_params_key_once():
    for name, st in PIPELINE.items():
        keys = [k for k in st.get("params", []) if isinstance(k, str)]
        assert len(keys) == len(set(keys)), f"stage {name} lists a params key twice: {keys}"


def test_validate_imports_no_torch():
    """The gate must be cheap: it runs whenever any param changes."""
    code = ("import sys, runpy; sys.argv = ['validate', '--help']\n"
            "try:\n    runpy.run_module('stages.validate', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'stages.validate imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
