"""The repository the stages run in, as a custom model and an imported teacher need it.

- ``factory_problem``: ``model.factory``'s module must be a ``.py`` file inside the repository (the working
  directory, where stages run). Its spec is found the way ``import`` would find it, *without running any
  module*: ``importlib.util.find_spec("a.b")`` imports the package ``a``, so each parent's spec is found in
  turn and its search locations passed on to the finders. An installed package (timm, ``torch.hub:load``), a
  built-in, frozen or compiled module is refused unless ``model.allow_external_factory: true``.
- ``module_code``: the sha256 of that file (stages/validate.py writes it to data/model_code.sha256, a
  dependency of every stage that builds the model, so editing the module reruns them).
- ``in_experiment_copy`` / ``git_tracks``: queued and ``--temp`` experiments run in a copy of the repository
  under ``.dvc/tmp/exps/`` that holds only the files git has (DVC_ROOT still names the main repository);
  validate refuses there a teacher checkpoint or factory module that git does not have, in one line.

Imports nothing heavy: stages/validate.py uses it without torch.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

EXP_COPY = (".dvc", "tmp", "exps")  # where DVC runs queued and --temp experiments (DESIGN.md §4)
GIT_TIMEOUT = 60  # seconds for one `git ls-files`
MAX_MODULE_BYTES = 64 << 20  # a model's source file is KBs; hashing is bounded all the same


def in_experiment_copy(cwd: str | os.PathLike | None = None, environ: dict | None = None) -> bool:
    """Is this a queued or ``--temp`` experiment, running in DVC's copy of the repository?"""
    env = os.environ if environ is None else environ
    here = Path.cwd() if cwd is None else Path(cwd)
    try:
        here = here.resolve()
        parts = here.parts
        if any(parts[i:i + len(EXP_COPY)] == EXP_COPY for i in range(len(parts))):
            return True
        root = env.get("DVC_ROOT")
        return bool(env.get("DVC_EXP_NAME") and root and Path(root).resolve() != here)
    except (OSError, RuntimeError):
        return False


def _installed_dirs() -> list[Path]:
    """Where the interpreter's standard library and installed packages live (also when a venv sits inside the
    repository)."""
    paths = sysconfig.get_paths()
    dirs = []
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            dirs.append(Path(paths[key]).resolve())
        except (KeyError, OSError, RuntimeError):
            pass
    return dirs


def module_spec(name: str):
    """The spec ``import name`` would use, or None; no module is run to find it (parents already imported are
    taken from sys.modules, as ``import`` does)."""
    spec, locations = None, None
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if i > 1 and not locations:
            return None  # the parent is a module, not a package
        loaded = sys.modules.get(sub)
        if loaded is not None:
            spec, locations = getattr(loaded, "__spec__", None), getattr(loaded, "__path__", None)
            if spec is None:
                return None
            continue
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is not None:
                spec = find(sub, None if i == 1 else list(locations), None)
                if spec is not None:
                    break
        if spec is None:
            return None
        locations = spec.submodule_search_locations
    return spec


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def expected_file(module: str, root: Path) -> str:
    """The file inside ``root`` that would hold ``module`` (``a/b.py``, or ``a/b/__init__.py`` when that exists)."""
    rel = Path(*module.split("."))
    package = rel / "__init__.py"
    return package.as_posix() if (root / package).is_file() else rel.with_suffix(".py").as_posix()


def not_committed(path: str, what: str) -> str:
    return (f"{what}: {path} is not committed in git, and a queued or --temp experiment runs in a copy of the "
            f"repository that holds only committed files: run `git add {shlex.quote(path)} && git commit`")


def factory_file(factory: str, root: str | os.PathLike | None = None) -> tuple[Path | None, str | None, bool]:
    """(the .py file of ``factory``'s module inside the repository, None, False), or (None, why it is not one,
    whether the module exists but outside the repository: installed, built-in, frozen or compiled)."""
    module = factory.split(":")[0]
    root = (Path.cwd() if root is None else Path(root)).resolve()
    try:
        spec = module_spec(module)
    except (ImportError, ValueError, OSError) as e:
        return None, f"cannot look up its module {module}: {' '.join(str(e).split())[:200]}", False
    if spec is None:
        if in_experiment_copy(root):
            main = Path(os.environ.get("DVC_ROOT") or root)
            return None, not_committed(expected_file(module, main), f"its module {module}"), False
        return None, (f"no module {module} is importable from the repository root {root}: the module must be a "
                      f"file inside the repository ({expected_file(module, root)} for {module})"), False
    origin = spec.origin if spec.has_location else None
    if spec.origin is None or spec.submodule_search_locations is not None and not origin:
        return None, f"{module} is a namespace package (a folder), not a module: name the .py file's module", False
    if not (origin and origin.endswith(".py")):
        kind = spec.origin if spec.origin in ("built-in", "frozen") else f"compiled ({spec.origin})"
        return None, f"its module {module} is {kind}, not a .py file of the repository ({root})", True
    path = Path(origin).resolve()
    installed = any(part in ("site-packages", "dist-packages") for part in path.parts) or any(
        path.is_relative_to(d) for d in _installed_dirs())
    if installed or not path.is_relative_to(root):
        return None, f"its module {module} is {path}, not a .py file of the repository ({root})", True
    return path, None, False


def factory_problem(factory: str, allow_external: bool) -> str | None:
    """Why ``model.factory`` may not be imported (None when it may)."""
    _, problem, outside = factory_file(factory)
    if problem is None or (outside and allow_external):
        return None
    if outside:
        problem += (": kdprune imports a factory from outside the repository (an installed package such as timm, "
                    "a hub loader such as torch.hub:load) only with model.allow_external_factory: true, which "
                    "lets params.yaml run that code")
    return problem


def module_code(factory: str, allow_external: bool) -> str:
    """One line for data/model_code.sha256: ``<sha256>  <file>`` of the factory's module (a file of the
    repository; with model.allow_external_factory, an installed module's source file, named by the module),
    ``external <module>`` for an external module without a source file."""
    module = factory.split(":")[0]
    root = Path.cwd().resolve()
    path, problem, outside = factory_file(factory, root)
    name = None if path is None else _relative(path, root)
    if path is None and outside and allow_external:
        spec = module_spec(module)
        origin = spec.origin if spec is not None and spec.has_location else None
        if not (origin and origin.endswith(".py")):
            return f"external {module}\n"
        path, name = Path(origin), f"{module} (external)"
    if path is None:
        raise ValueError(f"model.factory {factory!r}: {problem}")
    if path.stat().st_size > MAX_MODULE_BYTES:
        raise ValueError(f"{name}: over {MAX_MODULE_BYTES >> 20} MiB; not a model's source file")
    return f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {name}\n"


def git_tracks(path: str, cwd: str | os.PathLike | None = None) -> bool | None:
    """Whether git has ``path`` (a path relative to the repository root), or a ``.dvc`` file of it or of a folder
    above it (DVC then restores it); None when git cannot tell. The path is an argument, never shell text."""
    rel = Path(path)
    candidates = [rel.as_posix()] + [f"{p.as_posix()}.dvc" for p in (rel, *rel.parents) if p != Path(".")]
    try:
        r = subprocess.run(["git", "--literal-pathspecs", "ls-files", "-z", "--", *candidates], cwd=cwd,
                           capture_output=True, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return bool(r.stdout.strip(b"\0"))
