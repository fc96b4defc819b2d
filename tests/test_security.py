"""Security defaults: no code execution from data files, the MLflow UI on loopback only."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("kdprune", "stages", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def _refuses(func: ast.FunctionDef) -> bool:
    return any(isinstance(n, ast.Raise) for n in ast.walk(func))


def dangerous_calls(tree: ast.AST) -> list[str]:
    """eval/exec/compile, unrestricted pickle loads, marshal/shelve/dill, yaml.load/unsafe_load,
    np.load(allow_pickle=True), and torch.load without weights_only=True.

    pickle may be imported only to subclass ``pickle.Unpickler`` with a ``find_class`` that refuses
    (raises on) globals it does not allow, the documented way to restrict it ("Restricting Globals"
    in the pickle docs); calling ``pickle.load``/``loads``/``Unpickler(...)`` directly, or importing
    names from it, is flagged."""
    found = []
    pickle_names = {"pickle"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            pickle_names |= {a.asname or a.name for a in node.names if a.name == "pickle"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {m}" for m in mods if m and m.split(".")[0] in ("marshal", "shelve", "dill")]
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pickle":
                found.append(f"from pickle import {', '.join(a.name for a in node.names)}")
        if isinstance(node, ast.ClassDef):
            unpickler_base = any(isinstance(b, ast.Attribute) and isinstance(b.value, ast.Name)
                                 and b.value.id in pickle_names and b.attr in ("Unpickler", "_Unpickler")
                                 for b in node.bases)
            find_class = [f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "find_class"]
            if unpickler_base and not (find_class and _refuses(find_class[0])):
                found.append(f"class {node.name}(pickle.Unpickler) without a find_class that refuses globals")
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
            found.append(f"{name}()")
        elif owner in pickle_names and name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"):
            found.append(f"pickle.{name}()")
        elif owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
            found.append(f"yaml.{name}()")
        elif owner in ("np", "numpy") and name == "load" and not (
                isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
            found.append("np.load() without allow_pickle=False")
        elif owner == "torch" and name == "load" and not (
                isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
            found.append("torch.load() without weights_only=True")
    return found


RESTRICTED = """
import pickle
class Safe(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("numpy", "ndarray"):
            return object
        raise ValueError(name)
Safe(fh).load()
"""


def test_scanner_catches_what_it_should():
    bad = ("import pickle\npickle.load(f)\neval(s)\nexec(s)\nyaml.load(t)\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n")
    assert len(dangerous_calls(ast.parse(bad))) == 7
    assert dangerous_calls(ast.parse("yaml.safe_load(t)\ntorch.load(p, weights_only=True)\nmodel.eval()\n")) == []
    for unsafe in ("import pickle as p\np.loads(b)\n", "import pickle\npickle.Unpickler(f).load()\n",
                   "from pickle import loads\n", "from pickle import Unpickler\n", "import marshal\n",
                   "import pickle\nclass U(pickle.Unpickler):\n    pass\n",
                   "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n"
                   "        return super().find_class(m, n)\n"):
        assert dangerous_calls(ast.parse(unsafe)), unsafe
    assert dangerous_calls(ast.parse(RESTRICTED)) == []


def test_no_code_execution_from_data_in_the_package():
    assert SOURCES
    hits = {str(p.relative_to(ROOT)): c for p in SOURCES if (c := dangerous_calls(ast.parse(p.read_text())))}
    assert not hits, f"code that could run code from a data file: {hits}"


def test_readme_mlflow_ui_binds_to_loopback_and_says_why():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"mlflow (?:ui|server)[^`\n]*", readme)
    assert commands, "README has no MLflow UI command"
    for cmd in commands:
        assert "--host 127.0.0.1" in cmd, f"MLflow UI must bind to loopback: {cmd}"
    assert "0.0.0.0" not in readme
    assert re.search(r"127\.0\.0\.1[^.]*\.?[^.]*authentication", readme, re.S), "README must say why (no auth)"


def test_relative_data_root_through_a_symlink_out_of_the_repository_is_refused(tmp_path, monkeypatch):
    """Probe: data.root = 'data/raw', a symlink in the repository to a directory outside it, passed the
    lexical '..' check. Absolute paths stay allowed: they are explicit."""
    from kdprune.params import ParamsError, params_from_dict

    def params(root):
        return params_from_dict({s: {} for s in ("model", "teacher", "prune", "distill")} | {"data": {"root": root}})

    outside, repo = tmp_path / "outside", tmp_path / "repo"
    outside.mkdir()
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "raw").symlink_to(outside)
    (repo / "data" / "inside").mkdir()
    (repo / "data" / "link_inside").symlink_to(repo / "data" / "inside")
    monkeypatch.chdir(repo)
    with pytest.raises(ParamsError, match=r"data.root = 'data/raw' is invalid: .*no symlink to a directory outside it"):
        params("data/raw")
    with pytest.raises(ParamsError, match="data.root"):
        params("data/raw/sub")
    for ok in ("data/inside", "data/link_inside", "data/not_yet_there", str(outside)):
        assert params(ok).data.root == ok
