"""`dictsweep pull`: fetch a sweep's dictionaries from MLflow, with index.json."""

from __future__ import annotations

import json
import os
import shutil

from dictsweep.errors import InputError
from dictsweep.sae import grid_keys
from dictsweep.sweep.results import INDEX_METRICS
from dictsweep.track import SELECTED_TAG, download_dictionary, find_sweep


def point_params(params: dict) -> dict:
    """A run's grid-point params, typed as in index.json (absent keys are null)."""
    def number(key, kind):
        return kind(params[key]) if key in params and params[key] not in ("", "None") else None

    return {"architecture": params.get("architecture"), "n_latents": number("n_latents", int),
            **{key: parameter.parse(params.get(key)) for key, parameter in grid_keys().items()},
            "lr": number("lr", float), "seed": number("seed", int)}


def pull(sweep: str, out: str, include_all: bool = False, tracking_uri: str | None = None) -> list[dict]:
    """Download the selected (or all finished) dictionaries of `sweep` into `out`; returns index.json."""
    client, runs = find_sweep(tracking_uri, sweep)
    runs = [run for run in runs if run.tags.get("dictsweep.status") == "finished"]
    if not include_all:
        runs = [run for run in runs if run.tags.get(SELECTED_TAG) == "true"]
    if not runs:
        raise InputError(f"sweep {sweep!r} has no {'finished' if include_all else 'selected'} dictionaries to pull")
    os.makedirs(out, exist_ok=True)
    entries = []
    for run in runs:
        target = os.path.join(out, run.name)
        if os.path.exists(target):
            shutil.rmtree(target)
        downloaded = download_dictionary(client, run.run_id, os.path.join(out, ".download", run.name))
        shutil.move(downloaded, target)
        entries.append({"path": run.name, **point_params(run.params),
                        "selected": run.tags.get(SELECTED_TAG) == "true",
                        "metrics": {**{metric.index_name: None for metric in INDEX_METRICS},
                                    **{key.removeprefix("eval/"): value for key, value in run.metrics.items()
                                       if key.startswith("eval/")}}})
    shutil.rmtree(os.path.join(out, ".download"), ignore_errors=True)
    with open(os.path.join(out, "index.json"), "w") as file:
        json.dump(entries, file, indent=2)
    return entries
