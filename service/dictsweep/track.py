"""Everything the product says to MLflow (the only module that imports mlflow).

Layout: experiment = sweep name; a parent run for the sweep; a child run per SAE with its params,
training metrics over tokens and final `eval/...` metrics; the dictionary as the child's artifact
`dictionary/`; selected dictionaries registered as versions of one registered model per sweep.

Writes during a sweep are queued and sent in order by `flush`. While the server is unreachable
they stay queued and go out when it answers again, so an outage loses nothing and never stops
training; `flush(patience=...)` at the end waits for the server for a while before giving up.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from dictsweep.errors import InputError, RunError, held_stop
from dictsweep.track_server import store_lock, tracking_uri, unreachable
from dictsweep.track_views import KIND_TAG, TRAINING_KIND  # noqa: F401  (re-exported: the kind a sweep has)
from dictsweep.track_views import VIEW_TAG, experiment_tags, holds_view, run_url, runs_url

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# we retry ourselves without blocking the sweep, so MLflow's own retries stay short
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# the console is the sweep's: no "View run ... at" line per SAE, no database-setup notes
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
RETRY_SECONDS = 10.0  # after MLflow failed to answer, queued writes wait this long before the next try
log = logging.getLogger(__name__)

ROLE_TAG, SWEEP_ROLE, SAE_ROLE = "dictsweep.role", "sweep", "sae"
SELECTED_TAG, POINT_TAG, STATUS_TAG = "dictsweep.selected", "dictsweep.point", "dictsweep.status"
WHY_TAG = "dictsweep.why"  # why an SAE was or was not selected
ERROR_TAG, STOPPED_TAG = "dictsweep.error", "dictsweep.stopped"  # why a run failed / a sweep stopped
CREATION_TAG = "dictsweep.creation"  # a token per created run: a retried creation finds the first try's run
DICTIONARY_PATH = "dictionary"
INSPECT_PATH = "inspect"  # a run's `dictsweep inspect` output


@dataclass
class SaeRun:
    """A finished SAE as recorded: its run, point name, params, final metrics and tags."""

    run_id: str
    name: str
    params: dict
    metrics: dict
    tags: dict


class Tracker:
    """One sweep's MLflow runs."""

    def __init__(self, uri: str | None, experiment: str, patience: float = 120.0):
        from mlflow import MlflowClient

        self.uri = tracking_uri(uri)
        self.patience = patience
        with store_lock(self.uri):  # the client makes a fresh store's tables
            self.client = MlflowClient(self.uri)
            self.experiment_id = self.now(experiment_id, self.client, experiment)
        found = self.now(self.client.get_experiment, self.experiment_id)
        for key, value in experiment_tags(found.tags).items():  # model training, the runs table's view
            self.now(self.client.set_experiment_tag, self.experiment_id, key, value)
        self.queue: list[tuple[str, Callable[[], None]]] = []  # (what, operation) waiting to be sent
        self.retry_at = 0.0  # during an outage: when to try the queue again
        self.parent_id: str | None = None

    def now(self, operation: Callable, *args, **kwargs):
        """Call MLflow at once, retrying for up to `patience` seconds while it is unreachable."""
        deadline = time.time() + self.patience
        while True:
            try:
                with held_stop():
                    return operation(*args, **kwargs)
            except Exception as error:
                if not unreachable(error) or time.time() > deadline:
                    if unreachable(error):
                        raise RunError(f"MLflow at {self.uri} is unreachable: {error}") from error
                    raise
                time.sleep(2)

    def later(self, what: str, operation: Callable[[], None]) -> None:
        """Queue a write; `flush` sends queued writes in order."""
        self.queue.append((what, operation))

    def flush(self, patience: float = 0.0) -> bool:
        """Send queued writes in order; keep the rest on an outage. True when the queue is empty.

        With `patience`, keep retrying for that many seconds; then raise RunError if still unsent.
        """
        if not patience and time.time() < self.retry_at:
            return not self.queue  # the server was down a moment ago: don't stall the sweep on it
        deadline = time.time() + patience
        while self.queue:
            what, operation = self.queue[0]
            try:
                with held_stop():  # a stop waits for the write, and does not find it queued still
                    operation()
                    self.queue.pop(0)
            except Exception as error:
                if not unreachable(error):
                    raise
                if time.time() < deadline:
                    time.sleep(2)
                    continue
                if patience:
                    raise RunError(
                        f"MLflow at {self.uri} stayed unreachable; {len(self.queue)} writes "
                        f"(first: {what}) were not recorded: {error}"
                    ) from error
                log.warning(
                    "MLflow at %s is unreachable (%s); %d writes kept for later",
                    self.uri,
                    type(error).__name__,
                    len(self.queue),
                )
                self.retry_at = time.time() + RETRY_SECONDS
                return False
        return True

    # -- runs --------------------------------------------------------------------------------------
    def start_sweep(self, name: str, params: dict, tags: dict | None = None) -> str:
        self.parent_id = self.create_run(name, {ROLE_TAG: SWEEP_ROLE, **(tags or {})})
        self.now(self.log_params, self.parent_id, params)
        return self.parent_id

    def start_sae(self, name: str, params: dict, role: str = SAE_ROLE) -> str:
        """A child run of the sweep for one dictionary (an SAE, or a baseline with role="baseline")."""
        run_id = self.create_run(name, {"mlflow.parentRunId": self.parent_id, ROLE_TAG: role, POINT_TAG: name})
        self.now(self.log_params, run_id, params)
        return run_id

    def create_run(self, name: str, tags: dict) -> str:
        """A new run's id, made once: when the server made the run but its answer was lost (killed
        while answering), the retry finds that run by its creation token instead of making another."""
        token, tried = uuid.uuid4().hex, []

        def create():
            if tried:
                found = self.client.search_runs([self.experiment_id], f"tags.`{CREATION_TAG}` = '{token}'")
                if found:
                    return found[0]
            tried.append(True)
            return self.client.create_run(self.experiment_id, run_name=name, tags={**tags, CREATION_TAG: token})

        return self.now(create).info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items() if value is not None]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)) for key, value in tags.items()]
        self.later(f"tags of {run_id}", lambda: self.client.log_batch(run_id, tags=items))

    def end_run(self, run_id: str, failed: bool = False, status: str | None = None) -> None:
        """Queue ending a run: FINISHED, FAILED, or `status` (KILLED when the driver is stopped)."""
        status = status or ("FAILED" if failed else "FINISHED")
        self.later(f"end of {run_id}", lambda: self.client.set_terminated(run_id, status))

    def statuses(self, parent_id: str | None = None) -> dict[str, str]:
        """run id -> MLflow status (RUNNING, FINISHED, FAILED, KILLED) of a sweep run (this one's by
        default) and of its children."""
        parent_id = parent_id or self.parent_id
        found = self.now(
            self.client.search_runs,
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{parent_id}'",
            max_results=50_000,
        )
        statuses = {run.info.run_id: run.info.status for run in found}
        statuses[parent_id] = self.now(self.client.get_run, parent_id).info.status
        return statuses

    def reopen(self, run_id: str) -> None:
        """Mark a run that a stopped driver ended (KILLED, or FAILED with its node) running again, its
        sweep resumed: the tags saying why it ended go, so a finished run does not show an old error."""
        tags = self.now(self.client.get_run, run_id).data.tags
        for key in (ERROR_TAG, STOPPED_TAG):
            if key in tags:
                self.now(self.client.delete_tag, run_id, key)
        self.now(self.client.update_run, run_id, status="RUNNING")

    def log_missing(self, run_id: str, points: dict[int, dict[str, float]]) -> int:
        """Queue the metric points (step -> {key: value}) that the run does not have yet in MLflow,
        where an earlier driver may have sent some of them; returns how many were missing."""
        from mlflow.entities import Metric

        now, missing = int(time.time() * 1000), []
        for key in sorted({key for metrics in points.values() for key in metrics}):
            present = {metric.step for metric in self.now(self.client.get_metric_history, run_id, key)}
            missing += [
                Metric(key, float(metrics[key]), now, step)
                for step, metrics in sorted(points.items())
                if key in metrics and step not in present
            ]
        for start in range(0, len(missing), 1000):
            batch = missing[start : start + 1000]
            self.later(f"metrics of {run_id}", lambda batch=batch: self.client.log_batch(run_id, metrics=batch))
        return len(missing)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Queue metrics of one run at `step` (tokens)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.later(f"metrics of {run_id}", lambda: self.client.log_batch(run_id, metrics=items))

    def experiment_url(self) -> str:
        return runs_url(self.uri, self.experiment_id)

    def log_dataset(self, run_id: str, fields: dict) -> None:
        """Queue the activation dataset (`track_views.dataset_input`) as the run's input: its Dataset column."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(**fields), [InputTag("mlflow.data.context", "train")])]
        self.later(f"dataset of {run_id}", lambda: self.client.log_inputs(run_id, datasets=inputs))

    # -- artifacts and registry ----------------------------------------------------------------------
    def log_folder(self, run_id: str, fetch: Callable[[str], str], artifact_path: str = DICTIONARY_PATH) -> None:
        """Queue uploading a folder; `fetch(local_dir)` puts its files in a local folder when it is sent."""

        def upload() -> None:
            with tempfile.TemporaryDirectory() as local:
                self.client.log_artifacts(run_id, fetch(local), artifact_path)

        self.later(f"{artifact_path} of {run_id}", upload)

    def log_bytes(self, run_id: str, data: bytes, name: str, artifact_path: str | None = None) -> None:
        """Queue uploading one file made in memory (a plot, a JSON)."""

        def upload() -> None:
            with tempfile.TemporaryDirectory() as local:
                path = os.path.join(local, name)
                with open(path, "wb") as file:
                    file.write(data)
                self.client.log_artifact(run_id, path, artifact_path)

        self.later(f"{name} of {run_id}", upload)

    def log_comparison(self, rows: list[dict]) -> None:
        """Queue the sweep's table of SAEs (one dict per SAE: name, params, final metrics) on the parent
        run as `saes.csv` (the UI shows it as a table) and `saes.json`."""
        columns = list(dict.fromkeys(key for row in rows for key in row))  # first-seen order
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        self.log_bytes(self.parent_id, text.getvalue().encode(), "saes.csv")
        self.log_bytes(self.parent_id, json.dumps(rows, indent=1).encode(), "saes.json")

    def register(self, model_name: str, run_id: str, tags: dict) -> None:
        """Queue registering a run's dictionary as a new version of `model_name`."""

        def create() -> None:
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(
                    model_name, description="dictsweep: a sweep's selected dictionaries"
                )
            except MlflowException as error:
                if "RESOURCE_ALREADY_EXISTS" not in str(error) and "already exists" not in str(error):
                    raise
            if self.client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'"):
                return  # registered by a driver that stopped after it: a resumed sweep adds no second version
            self.client.create_model_version(
                model_name,
                source=f"runs:/{run_id}/{DICTIONARY_PATH}",
                run_id=run_id,
                run_link=run_url(self.uri, self.experiment_id, run_id),  # its page in the model-training view
                tags={key: str(value) for key, value in tags.items()},
            )

        self.later(f"registering {run_id}", create)


def experiment_id(client, name: str) -> str:
    """The id of the experiment `name`, made if there is none (another process may make it first)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error) and "already exists" not in str(error):
            raise
        return client.get_experiment_by_name(name).experiment_id


def sweep_url(uri: str | None, experiment: str) -> str | None:
    """`runs_url` of the experiment named `experiment`; None if MLflow does not answer or lacks it."""
    from mlflow import MlflowClient

    resolved = tracking_uri(uri)
    try:
        found = MlflowClient(resolved).get_experiment_by_name(experiment)
    except Exception:  # only a hint at the end of a sweep: never fail it
        return None
    return runs_url(resolved, found.experiment_id, holds_view(found.tags.get(VIEW_TAG))) if found else None


def find_sweep(uri: str | None, sweep: str) -> tuple["Tracker", list[SaeRun]]:
    """The latest sweep run named `sweep` and its SAE runs; InputError if there is none."""
    from mlflow import MlflowClient

    resolved = tracking_uri(uri)
    with store_lock(resolved):
        client = MlflowClient(resolved)
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        raise InputError(f"no sweep named {sweep!r} at {resolved} (no MLflow experiment of that name)")
    parents = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{ROLE_TAG}` = '{SWEEP_ROLE}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise InputError(f"experiment {sweep!r} at {resolved} holds no dictsweep sweep run")
    parent = parents[0].info.run_id
    children = client.search_runs(
        [experiment.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{ROLE_TAG}` = '{SAE_ROLE}'",
        max_results=50_000,
    )
    runs = [
        SaeRun(
            run.info.run_id,
            run.data.tags.get(POINT_TAG, run.info.run_name),
            dict(run.data.params),
            dict(run.data.metrics),
            dict(run.data.tags),
        )
        for run in children
    ]
    return client, sorted(runs, key=lambda run: run.name)


def download_dictionary(client, run_id: str, local_dir: str) -> str:
    """Fetch a run's dictionary files into `local_dir` one by one; returns the folder.

    The artifact names come from the tracking server: each must be a plain file name (no folder, no
    `..`), so that nothing is written outside `local_dir`.
    """
    from dictsweep.store.fs import folder_name

    entries = client.list_artifacts(run_id, DICTIONARY_PATH)
    if not entries:
        raise InputError(f"run {run_id} has no {DICTIONARY_PATH}/ artifact to download")
    os.makedirs(local_dir, exist_ok=True)
    for entry in entries:
        name = entry.path.removeprefix(f"{DICTIONARY_PATH}/")
        folder_name(name, f"run {run_id}: artifact {entry.path!r}")
        if entry.is_dir:
            raise InputError(f"run {run_id}: artifact {entry.path!r} is a folder; a dictionary holds only files")
        with tempfile.TemporaryDirectory(dir=local_dir, prefix=".artifact-") as scratch:
            os.replace(
                client.download_artifacts(run_id, f"{DICTIONARY_PATH}/{name}", scratch), os.path.join(local_dir, name)
            )
    return local_dir


def log_inspection(client, run_id: str, folder: str) -> None:
    """Log a dictionary's `dictsweep inspect` output (data file and feature browser) as artifacts
    `inspect/` of its run."""
    client.log_artifacts(run_id, folder, INSPECT_PATH)
