"""Where runs go: the tracking URI and the artifact location (see kdprune/tracking/__init__.py), retries on a
locked SQLite store, a read-only store, a tracking server that refuses or does not answer (and how long to wait for
it), the experiment, and the tags that mark kdprune's runs.
"""
from __future__ import annotations

import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, TypeVar

T = TypeVar("T")
FINGERPRINT_TAG = "kdprune.fingerprint"
ALIASES_TAG = "dvc_exp_aliases"  # other DVC experiments that reproduced the same result
KIND_TAG = "kdprune.kind"  # "pipeline" for one pipeline result, "report" for a sweep summary
TIMES_TAG = "kdprune.times_from"  # where the run's start/end times came from
# MLflow 3's UI opens an experiment on the GenAI traces view unless this tag says otherwise
# (values from the UI bundle of mlflow 3.17.2: "custom_model_development" | "genai_development")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingError(RuntimeError):
    """The tracking store could not be reached or written; the result files are intact (track exits 3)."""


class TrackingUserError(TrackingError):
    """A problem the user must fix first: a result that is not finite, a read-only store (exit 2)."""


def repo_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{repo_root(env) / 'mlflow.db'}"


# the password of a URI's userinfo (``http://user:secret@host``), also inside a longer text (an error message)
_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):[^/\s]*@")
SUPPRESS_LINKS_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # mlflow 3.17.2: no "View run ... at: <url>" lines


def redact(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ``***``: what kdprune prints or logs."""
    return _PASSWORD.sub(r"\g<head>:***@", str(text))


def has_password(uri: str) -> bool:
    return redact(uri) != uri


def quiet_links(uri: str) -> None:
    """A URI with a password: turn off mlflow's "View run/experiment at: <url>" lines, which print its
    credentials (mlflow's RestStore builds the link from the host with its userinfo)."""
    if has_password(uri):
        os.environ[SUPPRESS_LINKS_ENV] = "true"


def is_server_uri(uri: str) -> bool:
    """A tracking server (``http(s)://host:port``), not a store on this machine's disk."""
    return uri.lower().startswith(("http://", "https://"))


def artifact_location(env: Mapping[str, str] | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: ``<repo root>/mlartifacts`` for a local store. None for a
    tracking server: the server picks (``mlflow-artifacts:/`` under ``--serve-artifacts``, so every client
    uploads over HTTP, with no shared filesystem), not a path on whichever client created the experiment."""
    if is_server_uri(tracking_uri(env)):
        return None
    return (repo_root(env) / "mlartifacts").as_uri()


def retry(fn: Callable[[], T], what: str, attempts: int = 8) -> T:
    """Retry on SQLite lock contention (parallel queued experiments) with jittered backoff."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            locked = "database is locked" in str(e) or "database table is locked" in str(e)
            if not locked or i == attempts - 1:
                raise
            print(f"mlflow: store locked during '{what}' (attempt {i + 1}/{attempts}); retrying", file=sys.stderr)
            time.sleep(min(8.0, 0.25 * 2 ** i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def _read_only(where: str | os.PathLike) -> str:
    return (f"{where}: read-only (no write permission), so MLflow cannot log to it; make it writable "
            "(e.g. chmod u+w on it and its directory) or set MLFLOW_TRACKING_URI to a writable store. "
            "Nothing was logged; the results stay in metrics/ and plots/")


SQLITE_HEADER = b"SQLite format 3\x00"
# what SQLite / SQLAlchemy / MLflow's migrations say about a file that is not a usable MLflow store (3.17.2)
BROKEN_STORE = ("file is not a database", "database disk image is malformed", "out-of-date database schema",
                "Can't locate revision")


def _broken(path: Path, what: str) -> str:
    return (f"{path}: {what}, so it is not a usable MLflow store (not an outage: waiting does not help). Move it "
            f"aside (`mv {path} {path}.broken`; the next `track` creates a new store) or set MLFLOW_TRACKING_URI to "
            "a good one, then log the results with `python -m kdprune.tracking relog`. Nothing was logged; the "
            "results stay in metrics/ and plots/")


def check_sqlite_file(uri: str) -> None:
    """A local SQLite store that exists must be an SQLite database (an empty file is one: MLflow initialises it)."""
    path = _sqlite_path(uri)
    if path is None or not path.is_file():
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_HEADER))
    except OSError:
        return  # unreadable: the read-only check or MLflow names it
    if head and head != SQLITE_HEADER:
        raise TrackingUserError(_broken(path, "not an SQLite database (its first bytes are not SQLite's header)"))


def broken_store(uri: str, e: BaseException) -> str | None:
    """The one-line message when ``e`` says the local SQLite store is corrupt or its schema broken, else None."""
    path = _sqlite_path(uri)
    if path is None:
        return None
    seen: BaseException | None = e
    for _ in range(10):  # the exception chain, bounded
        if seen is None:
            return None
        text = str(seen)
        hit = next((m for m in BROKEN_STORE if m in text), None)
        if hit:
            detail = redact(text).strip().splitlines()[0][:160] if text.strip() else hit
            return _broken(path, f"its database or schema is broken ({detail})")
        seen = seen.__cause__ or seen.__context__
    return None


def check_writable(uri: str) -> None:
    """A local SQLite store must be writable, file and directory (SQLite writes a journal next to it)."""
    path = _sqlite_path(uri)
    if path is None:
        return
    if path.exists() and not os.access(path, os.W_OK):
        raise TrackingUserError(_read_only(path))
    if path.parent.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise TrackingUserError(_read_only(f"{path.parent} (the directory of {path.name})"))


# how mlflow 3.17.2 reports a server's refusal (rest_utils: a plain-text 401/403 answer, or the JSON error codes)
AUTH_REFUSED = ("error code 401", "error code 403", "UNAUTHENTICATED", "PERMISSION_DENIED")


def store_error(uri: str, e: Exception) -> TrackingError:
    """The one-line error for a failure to talk to the store: read-only store or artifact folder, a server that
    refuses our credentials (both :class:`TrackingUserError`), or unreachable."""
    if isinstance(e, TrackingError):
        return e
    if isinstance(e, PermissionError):  # e.g. mlartifacts/ not writable
        return TrackingUserError(_read_only(e.filename or redact(uri)))
    if "readonly database" in str(e):  # SQLite: "attempt to write a readonly database"
        return TrackingUserError(_read_only(_sqlite_path(uri) or redact(uri)))
    broken = broken_store(uri, e)
    if broken:
        return TrackingUserError(broken)
    if is_server_uri(uri) and any(m in str(e) for m in AUTH_REFUSED):
        status = "401" if "401" in str(e) or "UNAUTHENTICATED" in str(e) else "403"
        return TrackingUserError(
            f"the MLflow server at {redact(uri)} refused the request (HTTP {status}: "
            f"{'no or wrong credentials' if status == '401' else 'this user may not write to the experiment'}); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a user of its basic-auth app with EDIT "
            "permission), or MLFLOW_TRACKING_TOKEN for a server behind a token-checking proxy, then log the "
            "results with `python -m kdprune.tracking relog`; the results stay in metrics/ and plots/")
    return TrackingError(_unreachable(uri, e))


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, its type if it has none; URI passwords redacted."""
    text = redact(str(e)).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def _unreachable(uri: str, e: Exception) -> str:
    first = first_line(e)
    return (f"could not log to MLflow at {redact(uri)}: {first}. Nothing is lost: the results stay in metrics/ and plots/. "
            "Once the tracking store is reachable, log them with `python -m kdprune.tracking relog` "
            "(or `dvc repro track`).")


def ensure_experiment(client, name: str, location: str) -> str:
    """The experiment's id, creating it (with an absolute artifact location) when needed; tags it so that
    MLflow 3's UI opens it on the runs table. Safe against a parallel creation."""
    import mlflow  # heavy optional dependency: only when logging

    exp = retry(lambda: client.get_experiment_by_name(name), "get experiment")
    if exp is None:
        try:
            return retry(lambda: client.create_experiment(name, artifact_location=location,
                                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}),
                         "create experiment")
        except mlflow.exceptions.MlflowException:  # created by a parallel run meanwhile, or a store error
            exp = retry(lambda: client.get_experiment_by_name(name), "get experiment")
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        retry(lambda: client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND),
              "set experiment tag")
    return exp.experiment_id


def finished_pipeline_runs(client, experiment_ids: list[str], extra_filter: str = "") -> list:
    """The FINISHED pipeline runs of these experiments (a run left RUNNING by a kill is not a result)."""
    f = f"tags.`{KIND_TAG}` = 'pipeline' and attributes.status = 'FINISHED'"
    f += f" and {extra_filter}" if extra_filter else ""
    return retry(lambda: client.search_runs(experiment_ids, filter_string=f, max_results=50000), "search runs")


WAIT_ENV = "KDPRUNE_MLFLOW_WAIT_S"  # how long `track` waits for a tracking server that is down
WAIT_DEFAULT_S = 120
WAIT_MAX_S = 86400


def server_wait_seconds(env: Mapping[str, str]) -> float:
    """Seconds to keep retrying a tracking server that does not answer (``KDPRUNE_MLFLOW_WAIT_S``, default 120;
    0 = fail at once)."""
    text = env.get(WAIT_ENV, "").strip()
    if not text:
        return float(WAIT_DEFAULT_S)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= WAIT_MAX_S):
        raise TrackingUserError(f"{WAIT_ENV} = {text!r} is invalid: must be a number of seconds in [0, {WAIT_MAX_S}]")
    return value


def is_outage(e: BaseException) -> bool:
    """The server did not answer (connection refused or reset, timeout, 502/503/504 after mlflow's own retries),
    as opposed to an answer that refuses the request (401, 400, ...), which waiting does not fix."""
    import requests  # heavy optional dependency: only when logging

    seen: BaseException | None = e
    for _ in range(10):  # the exception chain, bounded
        if seen is None:
            break
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                             TimeoutError)):
            return True
        text = str(seen)
        # mlflow.utils.rest_utils wraps every transport failure as "API request to <url> failed with (timeout)
        # exception ..." (3.17.2); an HTTP error answer reads "failed with error code <status>"
        if "failed with exception" in text or "failed with timeout exception" in text:
            return True
        if any(f"error code {code}" in text for code in (502, 503, 504)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
