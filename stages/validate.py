"""Stage validate: check every key of params.yaml before any other stage runs (and before DVC deletes any
of their outputs) -> data/params.valid.

DVC removes a stage's outputs just before it runs that stage's command. Every other stage depends on
data/params.valid, so DVC runs this one first whenever any param changed; when params.yaml is invalid it
exits 2 with one line naming the key (also for a ``${...}`` value, which ``dvc exp run -S`` would resolve:
kdprune/overrides.py), and DVC stops before it touches the outputs of the later stages.
The file's content is constant: a valid params change leaves its hash (and so the later stages'
dependencies) unchanged. This script imports no torch, so the check costs well under a second.
"""
import argparse
import sys
from pathlib import Path

from kdprune import io, runlock
from kdprune.overrides import OverrideError, check_no_interpolation
from kdprune.params import ParamsError, flatten, load_params, safe_load_yaml

MARKER = Path("data/params.valid")
CONTENT = "params.yaml passed kdprune.params validation (see stages/validate.py)\n"


def main() -> int:
    argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    try:
        params = load_params()
        # a ${...} value: `dvc exp run -S` would resolve it (an environment variable into params.yaml and MLflow)
        check_no_interpolation(safe_load_yaml(Path("params.yaml").read_text()), "params.yaml")
        # the first stage of a run in this workspace: refuse a second run, record these params (kdprune/runlock.py)
        runlock.enter(flatten(params.to_dict()))
    except (ParamsError, OverrideError, runlock.RunLockError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    io.write_text(MARKER, CONTENT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
