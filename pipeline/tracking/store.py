"""Reaching the MLflow tracking store: which one, whether it answers, and retrying while it is away.

A tracking server can be down when a stage starts (then the stage stops before any work, naming the URI)
or go away while it runs. MLflow's own client retries a request for minutes with backoff, which would
stall Tune's driver loop, so stages turn that off (`fail_fast_requests`) and retry on their own terms:
the train stage's live logging skips while the server is away and catches up from the Tune results on
disk; the end of a stage retries for `mlflow.wait_seconds` and then reports what it could not log.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pipeline.config import ConfigError, home_repo
from pipeline.parallel import locked

T = TypeVar("T")

# MLflow error codes that mean "try again later" (a 5xx, a dropped connection, a busy store).
_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "RESOURCE_EXHAUSTED",
    "REQUEST_LIMIT_EXCEEDED",
}


class TrackingUnavailable(RuntimeError):
    """The tracking store stayed unreachable for longer than `mlflow.wait_seconds`."""


def tracking_uri(param: str, repo: Path) -> str:
    """`mlflow.tracking_uri` from params, else MLFLOW_TRACKING_URI, else the SQLite store of the repository
    the user runs DVC in (`home_repo`: not a queued experiment's temporary clone, which DVC deletes)."""
    if param:
        return param
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(home_repo(repo) / 'mlflow.db').resolve()}"


def artifact_root(uri: str, repo: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store in the user's repository
    (`mlartifacts/`); a server's own default otherwise."""
    return (home_repo(repo) / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None


def uri_source(param: str) -> str:
    """Which setting chose the tracking URI, for messages."""
    if param:
        return "mlflow.tracking_uri"
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default SQLite store"


def fail_fast_requests(timeout_s: int = 10) -> None:
    """One attempt per MLflow REST request, `timeout_s` at most; the stages' own retries take over.
    And no "View run at <url>" line per finished run: the stage prints the parent run's id once."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def is_transient(error: BaseException) -> bool:
    """True for errors that a later attempt may not hit: the server away, a timeout, a 5xx, a busy store."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    if isinstance(error, OSError | RequestException):
        return True
    return isinstance(error, MlflowException) and error.error_code in _TRANSIENT_CODES


def short(error: BaseException) -> str:
    """The part of an MLflow connection error that says what happened, e.g. `Connection refused`."""
    text = str(error)
    for marker, meaning in (
        ("Connection refused", "connection refused"),
        ("Max retries exceeded", "no connection"),  # MLflow cuts the message before the cause
        ("timed out", "timed out"),
        ("Name or service not known", "unknown host"),
    ):
        if marker in text:
            return meaning
    return text.splitlines()[0][:200] if text else type(error).__name__


def client(uri: str):
    """An `mlflow.MlflowClient` on the store at `uri` (the stages hold one without importing mlflow)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, source: str) -> None:
    """Fail in seconds, before any work, when the tracking store does not answer (one cheap request).
    From here on this process's MLflow requests fail fast (`fail_fast_requests`)."""
    fail_fast_requests()
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        # A local file: its folder must be writable. The store is created (its tables, by a migration
        # that takes seconds) by one process at a time: two queued experiments starting together would
        # otherwise both migrate it and one would fail with "database is locked" or "table exists".
        store = Path(uri[len("sqlite:///") :])
        if not (store.parent.is_dir() and os.access(store.parent, os.W_OK)):
            raise ConfigError(
                f"{source} = {uri!r}: {store.parent} is not a writable folder for the SQLite store"
            )
        with locked(store.with_name(store.name + ".lock")):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:
        if not is_transient(err):
            raise
        hint = (
            "start it (e.g. `mlflow server --host 127.0.0.1 --port <port>`) or unset it to use the repo's "
            "SQLite store"
            if uri.startswith("http")
            else "check the path and its permissions"
        )
        raise ConfigError(
            f"{source} = {uri!r}: the MLflow tracking store does not answer ({short(err)}); {hint}"
        ) from None


def retrying(action: Callable[[], T], what: str, uri: str, wait_s: float, log: Callable[[str], None]) -> T:
    """`action()`, retried with backoff while the store is away, for up to `wait_s` seconds in all."""
    began, delay = time.monotonic(), 1.0
    while True:
        try:
            return action()
        except Exception as err:
            if not is_transient(err):
                raise
            waited = time.monotonic() - began
            if waited + delay > wait_s:
                raise TrackingUnavailable(
                    f"MLflow at {uri} still unreachable after {waited:.0f} s of retries "
                    f"(mlflow.wait_seconds = {wait_s:g}) while {what} ({short(err)})"
                ) from None
            log(f"MLflow at {uri} unreachable ({short(err)}) while {what}; retrying in {delay:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
