"""Reaching the tracking server: which one a sweep uses, whether it answers before a sweep starts,
whether an error means it is gone for now (worth retrying), and the lock a fresh sqlite store needs.
No MLflow here: only `track.py` talks to it."""

from __future__ import annotations

import contextlib
import os
import re

from dictsweep.errors import InputError


def tracking_uri(uri: str | None) -> str:
    """The tracking URI to use: the spec's, else $MLFLOW_TRACKING_URI, else ./mlflow.db (sqlite)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))  # pin to the working directory
    return uri


def check_tracking(uri: str | None, seconds: float = 5.0) -> str:
    """The tracking URI, once seen usable within `seconds`: an HTTP server answers (any answer
    below 500: a server that refuses us is there), a sqlite file's folder exists. InputError if not."""
    import requests

    resolved = tracking_uri(uri)
    if resolved.startswith(("http://", "https://")):
        try:
            answer = requests.get(resolved.rstrip("/") + "/health", timeout=seconds)
        except requests.RequestException as error:
            raise InputError(
                f"tracking.uri {resolved}: no answer within {seconds:g} s ({type(error).__name__}); "
                "start the MLflow server, or correct the URI"
            ) from None
        if answer.status_code >= 500:
            raise InputError(
                f"tracking.uri {resolved}: the server answered {answer.status_code} "
                f"{answer.reason}; is the MLflow server behind it running?"
            )
    elif resolved.startswith("sqlite:///"):
        folder = os.path.dirname(resolved.removeprefix("sqlite:///"))
        if not os.path.isdir(folder):
            raise InputError(f"tracking.uri {resolved}: the folder {folder} does not exist")
    return resolved


@contextlib.contextmanager
def store_lock(uri: str):
    """For a sqlite store, an exclusive lock on a file beside it while MLflow may create or upgrade
    its tables: two processes doing that at once fail with 'duplicate column name'."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def unreachable(error: Exception) -> bool:
    """Whether an MLflow error means the server could not be reached or went away mid-answer (worth
    retrying later: MLflow's metric rows are keyed by their timestamp, so a resent batch adds nothing).

    MLflow wraps transport errors in an MlflowException that names them only in its text and its
    context, so the whole chain of causes is read."""
    import requests

    transport = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,  # an answer cut short (urllib3's IncompleteRead behind it)
        ConnectionError,  # refused, reset, aborted, broken pipe
    )
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, transport):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(error)
    return (
        any(
            sign in text
            for sign in (
                "Max retries exceeded",
                "Connection refused",
                "ConnectionError",
                "Connection broken",
                "Connection aborted",
                "IncompleteRead",
                "Read timed out",
                "RemoteDisconnected",
            )
        )
        or re.search(r"error code 50[234]\b", text) is not None
    )
