"""What the MLflow UI is given to show a sweep, as plain data (no mlflow import: track.py sends it).

- The runs table's view: MLflow 3's experiment page keeps a saved view as the experiment tag
  `mlflow.sharedViewState.<id>` (a JSON envelope: `name`, `createdAt`, `state`, the state holding
  the table's sort, visible columns, their order and widths), listed under "Views" and opened by
  the URL parameter `viewStateShareKey=<id>`. A URL holding any sort or filter parameter of its own
  ignores the view, so the link carries the view alone.
- `workflowType=machine_learning` in a URL opens the "Model training" side of the UI; without it
  the UI falls back to the browser's last choice (GenAI at first), the run pages included.
- The activation dataset as an MLflow dataset input (the runs table's "Dataset" column).
"""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import quote

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store
# MLflow 3's UI files an experiment as GenAI (traces) or model training by this tag, and by the URL's
# `workflowType` (which wins over the tag where the UI offers both): sweeps are model training
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
TRAINING = "workflowType=machine_learning"
VIEW_ID = "dictsweep-saes"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
VIEW_NAME = "dictsweep: SAEs by eval FVU"
# final `eval/` metrics are logged at step 0: the run page draws a metric whose last step is 0 as a
# bar with its value, one whose last step is >= 1 as a line (one point over an axis around that step)
EVAL_STEP = 0


def column(kind: str, key: str) -> str:
    """The runs table's column id of a param, metric, tag or attribute (MLflow's canonical key)."""
    return f"{kind}.`{key}`"


# (column, width in px): what a researcher sorts SAEs by, narrow enough that every column that has
# values fits beside the run name at 1920 px with MLflow's assistant panel open; a column whose key
# no run has (k in a relu sweep, loss_recovered on synthetic data) is not drawn
SAE_COLUMNS = (
    (column("params", "architecture"), 85),
    (column("params", "n_latents"), 75),
    (column("params", "target_l0"), 75),
    (column("params", "l1_coef"), 75),
    (column("params", "k"), 50),
    (column("metrics", "eval/l0"), 65),
    (column("metrics", "eval/fvu"), 75),
    (column("metrics", "eval/dead_fraction"), 75),
    (column("metrics", "eval/loss_recovered"), 75),
    (column("metrics", "eval/mmcs_ground_truth"), 75),
    (column("tags", "dictsweep.selected"), 75),  # track.SELECTED_TAG
    (column("attributes", "Dataset"), 180),
)
FIXED_COLUMNS = (("attributes.`Run Name`", None), ("runDateAndNestInfo", 110))  # always drawn, first
TRAILING_COLUMNS = (("duration", 80),)


def view_state() -> dict:
    """The runs table's state: SAEs by eval FVU (best first), the columns above in that order."""
    ordered = FIXED_COLUMNS + SAE_COLUMNS + TRAILING_COLUMNS
    return {
        "orderByKey": column("metrics", "eval/fvu"),
        "orderByAsc": True,
        "selectedColumns": [key for key, _ in SAE_COLUMNS],
        "columnOrder": [key for key, _ in ordered],
        "columnWidths": {key: width for key, width in ordered if width},
        "runsHiddenMode": "SHOW_ALL",  # the chart view draws every SAE, not the first 10
    }


def saved_view(created_ms: int) -> str:
    """The experiment tag's value (VIEW_TAG) that holds the view."""
    return json.dumps({"name": VIEW_NAME, "createdAt": created_ms, "state": json.dumps(view_state())})


def experiment_tags(tags: dict[str, str]) -> dict[str, str]:
    """The tags a sweep's experiment lacks, of those it is given (its current `tags`): its kind, and
    this version's view (a view written before, or saved over in the UI, is written again)."""
    missing = {} if tags.get(KIND_TAG) == TRAINING_KIND else {KIND_TAG: TRAINING_KIND}
    if not holds_view(tags.get(VIEW_TAG)):
        missing[VIEW_TAG] = saved_view(int(time.time() * 1000))
    return missing


def holds_view(tag_value: str | None) -> bool:
    """Whether an experiment tag's value is this version's view (else it is written again)."""
    try:
        return json.loads(json.loads(tag_value or "")["state"]) == view_state()
    except (ValueError, KeyError, TypeError):
        return False


def server(uri: str) -> str:
    """The UI's address for a tracking URI (a local store: once `mlflow ui` runs)."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def runs_url(uri: str, experiment_id: str, with_view: bool = True) -> str:
    """The address a person opens to see a sweep's runs table (with its saved view when the
    experiment has it)."""
    view = f"&viewStateShareKey={VIEW_ID}" if with_view else ""
    return f"{server(uri)}/#/experiments/{experiment_id}/runs?{TRAINING}{view}"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the model-training view."""
    return f"{server(uri)}/#/experiments/{experiment_id}/runs/{quote(run_id)}?{TRAINING}"


def dataset_input(uri: str, manifest) -> dict:
    """An activation dataset (its URI and `manifest.json`, a store.manifest.Manifest) as the fields of
    an MLflow dataset: name (the prefix's last folder), digest (of the manifest's shard checksums: the
    same rows give the same digest wherever they are stored), source, schema and profile."""
    lines = [f"{shard.path} {shard.sha256}" for shard in (*manifest.shards, *manifest.eval_shards)]
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    source = manifest.source or {}
    tensor = {
        "type": "tensor",
        "tensor-spec": {"dtype": manifest.dtype, "shape": [-1, manifest.d_model]},
        "name": "act",
    }
    profile = {
        "rows": manifest.n_rows,
        "eval_rows": sum(shard.rows for shard in manifest.eval_shards),
        "d_model": manifest.d_model,
        "dtype": manifest.dtype,
        **{key: source[key] for key in ("model", "hook", "dataset") if source.get(key)},
    }
    return {
        "name": uri.rstrip("/").rsplit("/", 1)[-1] or uri,
        "digest": digest,
        "source_type": "s3" if uri.startswith("s3://") else "local",
        "source": json.dumps({"uri": uri}),
        "schema": json.dumps({"mlflow_tensorspec": {"features": json.dumps([tensor]), "targets": None}}),
        "profile": json.dumps(profile),
    }
