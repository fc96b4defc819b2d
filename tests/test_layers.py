"""The package's shape: import-linter's contract (.importlinter) holds, no kdprune import hides inside a function,
an import inside a function is a heavy optional dependency that says so, and no module is over 500 lines."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

MODULES = sorted(p for p in (ROOT / "kdprune").rglob("*.py") if "__pycache__" not in p.parts)
MAX_LINES = 500


def comment_above(lines: list[str], i: int) -> bool:
    """Whether the block of import lines that line ``i`` (0-based) belongs to starts under a comment line."""
    j = i - 1
    while j >= 0 and lines[j].strip().startswith(("import ", "from ")):
        j -= 1
    return j >= 0 and lines[j].strip().startswith("#")


def function_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, whether the line or the one above it has a comment) of every import statement
    inside a function of ``path``."""
    src = path.read_text()
    lines = src.splitlines()
    out = []
    for fn in ast.walk(ast.parse(src)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." * node.level + (node.module or "")]
                else:
                    continue
                said = "#" in lines[node.lineno - 1] or comment_above(lines, node.lineno - 1)
                out += [(node.lineno, name, said) for name in names]
    return sorted(set(out))


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_kdprune_import_inside_a_function_and_every_other_one_says_why(path):
    found = function_imports(path)
    hidden = [(n, m) for n, m, _ in found if m == "kdprune" or m.startswith(("kdprune.", "."))]
    assert not hidden, f"{path.name}: kdprune imports inside functions hide the import graph: {hidden}"
    silent = [(n, m) for n, m, said in found if not said]
    assert not silent, f"{path.name}: imports inside functions without a comment saying why: {silent}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_checks_see_a_hidden_import(tmp_path):
    """The in-function check catches what it is for (so it cannot pass by seeing nothing)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from kdprune import io\n    import numpy\n    # heavy optional: only here\n"
                 "    import mlflow\n    import onnx\n")
    assert function_imports(f) == [(2, "kdprune", False), (3, "numpy", False), (5, "mlflow", True), (6, "onnx", True)]
