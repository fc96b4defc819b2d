"""Stage validate: check every key of params.yaml before any other stage runs (and before DVC deletes any
of their outputs) -> data/params.valid, data/model_code.sha256.

DVC removes a stage's outputs just before it runs that stage's command. Every other stage depends on
data/params.valid, so DVC runs this one first whenever any param changed; when params.yaml is invalid it
exits 2 with one line naming the key (also for a ``${...}`` value, which ``dvc exp run -S`` would resolve:
kdprune/overrides.py), and DVC stops before it touches the outputs of the later stages.
The file's content is constant: a valid params change leaves its hash (and so the later stages'
dependencies) unchanged. This script imports no torch, so the check costs well under a second.

data/model_code.sha256 holds the sha256 of ``model.factory``'s module file (``none`` unless ``model.arch:
custom``), a dependency of every stage that builds the model: the file can sit anywhere in the repository,
so dvc.yaml cannot name it, and DVC runs this stage every time (``always_changed``) to notice an edit to it.
Its content changes only when the module does, so only then do the later stages rerun.

In a queued or ``--temp`` experiment (DVC's copy of the repository, which holds only the files git has), a
``teacher.checkpoint`` or factory module that git does not have is refused in one line saying to commit it.
"""
import argparse
import sys
from pathlib import Path

from kdprune import io, runlock, workspace
from kdprune.overrides import OverrideError, check_no_interpolation
from kdprune.params import Params, ParamsError, flatten, load_params, safe_load_yaml

MARKER = Path("data/params.valid")
CONTENT = "params.yaml passed kdprune.params validation (see stages/validate.py)\n"
MODEL_CODE = Path("data/model_code.sha256")


class UncommittedError(ParamsError):
    """A file the experiment needs is not in git, so a queued or --temp experiment's copy lacks it."""


def model_code(params: Params) -> str:
    """The content of data/model_code.sha256."""
    m = params.model
    return workspace.module_code(m.factory, m.allow_external_factory) if m.arch == "custom" else "none\n"


def check_committed(params: Params) -> None:
    """In DVC's copy of the repository (queued, --temp): the files the params name must be in git."""
    if not workspace.in_experiment_copy():
        return
    files = []
    if params.teacher.init == "checkpoint":
        files.append(("teacher.checkpoint", params.teacher.checkpoint))
    if params.model.arch == "custom":
        path, _, _ = workspace.factory_file(params.model.factory)
        if path is not None:
            files.append((f"model.factory {params.model.factory}", path.relative_to(Path.cwd().resolve()).as_posix()))
    for what, path in files:
        if workspace.git_tracks(path) is False:
            raise UncommittedError(workspace.not_committed(path, what))


def main() -> int:
    argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    try:
        params = load_params()
        # a ${...} value: `dvc exp run -S` would resolve it (an environment variable into params.yaml and MLflow)
        check_no_interpolation(safe_load_yaml(Path("params.yaml").read_text()), "params.yaml")
        check_committed(params)
        code = model_code(params)
        # the first stage of a run in this workspace: refuse a second run, record these params (kdprune/runlock.py)
        runlock.enter(flatten(params.to_dict()))
        io.write_text(MARKER, CONTENT)
        io.write_text(MODEL_CODE, code)
    except (ParamsError, OverrideError, runlock.RunLockError, ValueError, OSError) as e:  # OSError: io.OutputError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
