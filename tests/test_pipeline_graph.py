"""dvc.yaml against the code: no param reaches a shell, validation runs first, and every stage lists the
code it imports."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
GATE = "data/params.valid"


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
    """kdprune modules that ``path`` imports at module level, transitively, as repository paths.
    ``from kdprune.models import zoo`` is the module kdprune/models/zoo.py; ``from kdprune.models import build_model``
    is the package's kdprune/models/__init__.py."""
    seen = set() if seen is None else seen
    for node in ast.parse(path.read_text()).body:
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and (node.module == "kdprune"
                                                                 or node.module.startswith("kdprune.")):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("kdprune.")]
        for name in names:
            for rel in module_files(name):
                if rel not in seen:
                    seen.add(rel)
                    module_imports(ROOT / rel, seen)
    return seen


def test_no_command_interpolates_anything():
    """DVC pastes ${...} values into the shell command before kdprune.params has seen them."""
    text = "\n".join(line.split("#")[0] for line in (ROOT / "dvc.yaml").read_text().splitlines())  # no comments
    assert "${" not in text and "foreach" not in text and "matrix" not in text
    for name, st in PIPELINE.items():
        assert re.fullmatch(r"python -m stages\.\w+", st["cmd"]), (name, st["cmd"])


def test_validate_runs_first_and_gates_every_stage():
    validate = PIPELINE["validate"]
    assert validate["params"] == [{"params.yaml": None}]  # every key of params.yaml
    assert validate["outs"] == [{GATE: {"persist": True}}]  # kept when validation fails
    for name, st in PIPELINE.items():
        if name != "validate":
            assert GATE in st["deps"], f"stage {name} does not wait for params validation"


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_stage_deps_list_exactly_the_code_it_imports(name):
    script = f"stages/{name}.py"
    code = {d for d in PIPELINE[name]["deps"] if d.endswith(".py")}
    # `python -m stages.X` runs stages/__init__.py first (the venv check)
    package = {"stages/__init__.py"} | module_imports(ROOT / "stages/__init__.py")
    assert code == {script} | package | module_imports(ROOT / script)


def test_validate_imports_no_torch():
    """The gate must be cheap: it runs whenever any param changes."""
    code = ("import sys, runpy; sys.argv = ['validate', '--help']\n"
            "try:\n    runpy.run_module('stages.validate', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'stages.validate imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
