"""One pipeline at a time in a workspace, every stage of it on the params it started with.

DVC releases its repo lock while a stage's command runs. So a second ``dvc exp run`` in the same workspace can
take it in the middle of the first run, stash and restore the whole workspace, and write its ``-S`` values into
params.yaml: the first run's later stages would then read the second's params (``--queue`` and ``--temp`` stash
the workspace in the same way). When DVC runs a stage in the main workspace (``DVC_STAGE`` set and the working
directory is ``DVC_ROOT``; queued and ``--temp`` experiments run in a copy of their own and are left alone):

- the first kdprune stage of a ``dvc repro`` / ``dvc exp run`` records its DVC process (pid and start time) and
  the params it loaded in ``.dvc/tmp/kdprune-run.json``, and marks the workspace busy in DVC's experiment lock
  (``.dvc/tmp/exps/rwlock``, the entry DVC itself holds while it stashes the workspace), so another
  ``dvc exp run`` in this workspace (``--queue``, ``--temp`` included) is refused by DVC before it touches
  params.yaml, until this DVC process has ended;
- every later stage of that run refuses to run on other params than the recorded ones, and a stage of another
  DVC process (one that got in before the mark) is refused while the recorded one lives;
- a small watcher process (``python -m kdprune.runlock``) clears both once the DVC process has ended; a record
  whose DVC process is gone (the watcher killed too) is taken over by the next run.

``track`` also checks, before it logs, that dvc.lock recorded every stage with the params it logs
(kdprune/tracking/result.py): the guarantee holds for a stage restored from DVC's run-cache too.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import psutil

from kdprune import io
from kdprune.errors import UserError

RECORD = Path(".dvc/tmp/kdprune-run.json")  # under the repo root; .dvc/tmp is git-ignored by DVC
GUARD = Path(".dvc/tmp/kdprune-run.lock")  # fcntl lock around reading and writing the record
DVC_EXP_LOCK_DIR = Path(".dvc/tmp/exps")  # DVC's experiment rwlock (dvc/repo/experiments/utils.py, 3.67.1)
DVC_WORKSPACE = "workspace"  # the path DVC write-locks while it stashes the workspace (queue/workspace.py)
MARK = "[kdprune: an experiment is running in this workspace; start yours when it has finished]"


class RunLockError(UserError):
    """Another pipeline runs in this workspace, or params.yaml changed during this one."""


def canonical(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params as JSON gives them back (the form kept in the record), so two loads of one file compare equal."""
    return json.loads(json.dumps(dict(params), sort_keys=True, default=str))


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def first_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """``"prune.ratio was 0.5 when it started, is 0.6 now"`` for the first key that differs (and how many more)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, KeyError) != new.get(k, KeyError))
    if not keys:
        return None
    k = keys[0]
    was = _short(old[k]) if k in old else "absent"
    now = _short(new[k]) if k in new else "absent"
    more = f" (and {len(keys) - 1} more key{'s' if len(keys) > 2 else ''})" if len(keys) > 1 else ""
    return f"{k} was {was} when it started, is {now} now{more}"


def workspace_root(env: Mapping[str, str]) -> Path | None:
    """The repo root when DVC runs this stage in its main workspace; None otherwise (not under DVC, or a queued or
    ``--temp`` experiment in ``.dvc/tmp/exps/...``, which has a workspace of its own)."""
    if not env.get("DVC_STAGE") or not env.get("DVC_ROOT"):
        return None
    root = Path(env["DVC_ROOT"]).resolve()
    return root if Path.cwd().resolve() == root else None


def _is_dvc(cmdline: list[str]) -> bool:
    names = [Path(a).name for a in cmdline[:2]]
    return "dvc" in names or cmdline[1:3] == ["-m", "dvc"]


def dvc_process() -> psutil.Process | None:
    """The DVC process that runs this stage: the nearest ancestor that runs ``dvc`` (above a shell, torchrun...)."""
    try:
        p = psutil.Process().parent()
        for _ in range(12):
            if p is None:
                return None
            if _is_dvc(p.cmdline()):
                return p
            p = p.parent()
    except psutil.Error:
        return None
    return None


def _alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 0.01
    except (psutil.Error, ValueError, OverflowError):
        return False


@contextlib.contextmanager
def _guarded(root: Path) -> Iterator[None]:
    path = root / GUARD
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_record(root: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get("pid"), int) and isinstance(rec.get("started"), (int, float))
    return rec if ok and isinstance(rec.get("params"), dict) else None


def enter(params: Mapping[str, Any], stage: str | None = None, env: Mapping[str, str] | None = None) -> None:
    """Called by each stage once it has loaded ``params`` (flat): see the module docstring. Raises
    :class:`RunLockError` (one line; the stage exits 2 before it writes anything) when another DVC process runs a
    pipeline in this workspace, or when these params are not the ones this run started with."""
    env = os.environ if env is None else env
    root = workspace_root(env)
    if root is None:
        return
    stage = stage or env.get("DVC_STAGE", "?")
    proc = dvc_process()
    if proc is None:  # DVC_STAGE set by hand, or DVC runs in a way we do not recognise: dvc.lock's check remains
        return
    try:
        me = {"pid": proc.pid, "started": proc.create_time(), "cmd": " ".join(proc.cmdline()[1:])[:300]}
    except psutil.Error:
        return
    params = canonical(params)
    with _guarded(root):
        rec = read_record(root)
        if rec is not None and _alive(rec["pid"], rec["started"]):
            if rec["pid"] != me["pid"]:
                raise RunLockError(
                    f"another experiment is running in this workspace (DVC pid {rec['pid']}: "
                    f"{str(rec.get('cmd', ''))[:200]}); stage {stage} stops. Run one at a time here, or queue "
                    "them (`dvc exp run --queue ...`, then `dvc queue start`: each runs in a copy of its own)")
            diff = first_difference(rec["params"], params)
            if diff:
                raise RunLockError(
                    f"params.yaml changed while this pipeline was running: {diff} (another `dvc exp run` or an "
                    f"edit in this workspace); stage {stage} stops, so no result mixes the two and nothing is logged. "
                    "Restore params.yaml (`git show HEAD:params.yaml > params.yaml`) and run again")
            return
        io.write_json(root / RECORD, {**me, "stage": stage, "exp": env.get("DVC_EXP_NAME", ""), "params": params})
    _mark_dvc_workspace(root, me)
    _start_watcher(root, me)


def _dvc_rwlock():
    """DVC's own editor of its rwlock file (its guard file and format), or None if this DVC has none."""
    try:
        from dvc.fs import localfs  # heavy optional dependency: only when a stage runs under DVC
        from dvc.rwlock import _edit_rwlock  # heavy optional dependency: only when a stage runs under DVC
    except ImportError:
        return None

    def edit(root: Path):
        lock_dir = root / DVC_EXP_LOCK_DIR
        lock_dir.mkdir(parents=True, exist_ok=True)
        return _edit_rwlock(str(lock_dir), localfs, False)

    return edit


def _entry(me: Mapping[str, Any]) -> dict[str, Any]:
    return {"pid": int(me["pid"]), "cmd": f"{me['cmd']} {MARK}"}


def _mark_dvc_workspace(root: Path, me: Mapping[str, Any]) -> None:
    """Hold DVC's write lock on the workspace for the DVC process ``me``: DVC refuses any other ``exp run`` (its
    stash of the workspace) while that process lives. Best effort: without it, the checks above still hold."""
    edit = _dvc_rwlock()
    if edit is None:
        return
    with contextlib.suppress(Exception):  # noqa: BLE001 - DVC's lock busy or changed: the params checks remain
        with edit(root) as lock:
            held = lock["write"].get(DVC_WORKSPACE)
            if held and held.get("pid") != me["pid"] and psutil.pid_exists(int(held["pid"])):
                return  # DVC itself is stashing the workspace right now: never take over a live entry
            lock["write"][DVC_WORKSPACE] = _entry(me)


def release(root: Path, me: Mapping[str, Any]) -> None:
    """Clear the record and DVC's workspace entry of the DVC process ``me`` (if they are still its own)."""
    with _guarded(root):
        rec = read_record(root)
        if rec is not None and rec["pid"] == me["pid"] and abs(rec["started"] - me["started"]) < 0.01:
            (root / RECORD).unlink(missing_ok=True)
    edit = _dvc_rwlock()
    if edit is None:
        return
    with contextlib.suppress(Exception):  # noqa: BLE001 - DVC removes an entry of a dead pid itself, with a warning
        with edit(root) as lock:
            held = lock["write"].get(DVC_WORKSPACE)
            if held and held.get("pid") == me["pid"] and str(held.get("cmd", "")).endswith(MARK):
                del lock["write"][DVC_WORKSPACE]


def _start_watcher(root: Path, me: Mapping[str, Any]) -> None:
    """A detached process that waits for the DVC process to end, then releases (no pipe of DVC's is kept open)."""
    package_root = str(Path(__file__).resolve().parents[1])  # this kdprune, wherever the stage imported it from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-m", "kdprune.runlock", str(root), str(me["pid"]), repr(me["started"])],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, cwd=root, env=env)


def watch(root: Path, pid: int, started: float, poll: float = 0.1) -> None:
    me = {"pid": pid, "started": started}
    while _alive(pid, started):
        time.sleep(poll)
    release(root, me)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdprune.runlock",
                                 description="(internal) release a workspace run once its DVC process has ended")
    ap.add_argument("root", type=Path)
    ap.add_argument("pid", type=int)
    ap.add_argument("started", type=float)
    args = ap.parse_args(argv)
    watch(args.root, args.pid, args.started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
