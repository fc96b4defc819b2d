"""Share DVC's run-cache between machines, records *and* the outputs they name.

  python -m kdprune.runcache push [-r REMOTE]   # after running stages or experiments on this machine
  python -m kdprune.runcache pull [-r REMOTE]   # before running them on another

``dvc push --run-cache`` (DVC 3.67) copies only the run records (``dvc/stage/cache.py``: ``transfer`` copies
``runs/``), and ``dvc exp push`` only an experiment's cached outputs. A stage restores from a record only
when every output it names is in the local cache, metrics included, and the pipeline's metrics are
``cache: false`` (so that the run-cache covers them at all), so no DVC command ever uploads them: on another
machine the restore misses and the stage trains again. This pushes the records with DVC's own code, then
every object they name (``StageCache.get_used_objs``); pull does the reverse. An object missing on one side
is reported by DVC and skipped: its stage just runs again there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdprune.errors import UserError


def _records(repo) -> list[tuple[str, str]]:
    """The run records in the local cache, as DVC's ``StageCache`` names them: (key, value)."""
    runs = Path(repo.cache.legacy.path) / "runs"
    return sorted((p.parent.name, p.name) for p in runs.glob("*/*/*") if p.is_file())


def _objects(repo) -> set:
    objs: set = set()
    for hashes in repo.stage_cache.get_used_objs(_records(repo)).values():
        objs.update(hashes)
    return objs


def push(remote: str | None = None, root: str = ".") -> int:
    """Records + their outputs to the remote. Returns the number of objects named."""
    from dvc.repo import Repo  # heavy optional dependency: only when talking to DVC

    with Repo(root) as repo, repo.lock:
        repo.stage_cache.push(remote)
        objs = _objects(repo)
        repo.cloud.push(objs, remote=remote)
    return len(objs)


def pull(remote: str | None = None, root: str = ".") -> int:
    """Records + their outputs from the remote into the local cache (the workspace is not touched)."""
    from dvc.repo import Repo  # heavy optional dependency: only when talking to DVC

    with Repo(root) as repo, repo.lock:
        repo.stage_cache.pull(remote)
        objs = _objects(repo)
        try:
            repo.cloud.pull(objs, remote=remote)
        except Exception as e:  # noqa: BLE001 - objects the remote lacks: those stages run again
            print(f"runcache: some outputs are not on the remote ({str(e).splitlines()[0][:200]}); "
                  "their stages will run again", file=sys.stderr)
    return len(objs)


class RunCacheError(UserError):
    """The run-cache could not be pushed or pulled (no remote configured, unreachable, not a DVC repo)."""


def sync(cmd: str, remote: str | None = None, root: str = ".") -> int:
    """``push`` or ``pull``; DVC's failures become one-line :class:`RunCacheError`s."""
    try:
        return (push if cmd == "push" else pull)(remote, root)
    except Exception as e:  # noqa: BLE001 - DVC's errors: no remote configured, unreachable, not a DVC repo
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RunCacheError(f"{cmd} of the run-cache failed: {first}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.runcache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("push", "pull"))
    ap.add_argument("-r", "--remote", default=None, help="DVC remote (default: the default remote)")
    args = ap.parse_args(argv)
    try:
        n = sync(args.cmd, args.remote)
    except RunCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"runcache: {args.cmd}ed the run records and the {n} objects they name")
    return 0


if __name__ == "__main__":
    sys.exit(main())
