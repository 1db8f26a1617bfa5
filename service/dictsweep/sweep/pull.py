"""`dictsweep pull`: fetch a sweep's dictionaries from MLflow, with index.json.

Run names, tags and artifact names come from the tracking server, where anyone who may write to it
sets them: each is checked before it becomes a path, and nothing is written outside `--out`. A
dictionary is downloaded and loaded (its cfg.json checked against its tensors) beside its folder,
inside `--out`, and only then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from dictsweep.errors import InputError
from dictsweep.sae import grid_keys
from dictsweep.store import fs
from dictsweep.sweep.results import INDEX_METRICS
from dictsweep.track import SELECTED_TAG, WHY_TAG, download_dictionary, find_sweep

INDEX_NAME = "index.json"


def point_params(params: dict, metrics: dict | None = None) -> dict:
    """A run's grid-point params, typed as in index.json (absent keys are null); for an L0 target,
    `l1_coef` is the coefficient training ended with (its last `l1_coef` metric)."""

    def number(key, kind):
        return kind(params[key]) if key in params and params[key] not in ("", "None") else None

    point = {
        "architecture": params.get("architecture"),
        "n_latents": number("n_latents", int),
        **{
            key: parameter.parse(params.get(key))
            for key, parameter in grid_keys().items()
            if parameter.replaces is None
        },
        "lr": number("lr", float),
        "seed": number("seed", int),
    }
    target = number("target_l0", float)
    if target is not None:
        steered = (metrics or {}).get("l1_coef")
        point.update(l1_coef=float(steered) if isinstance(steered, (int, float)) else None, target_l0=target)
    return point


def folder_names(sweep: str, runs: list) -> dict[str, str]:
    """run id -> the folder its dictionary goes to; InputError naming the run for an unsafe or repeated name."""
    folders: dict[str, str] = {}
    for run in runs:
        where = f"sweep {sweep!r}, run {run.run_id}"
        name = fs.folder_name(run.name, where)
        if name == INDEX_NAME:
            raise InputError(f"{where}: the name {name!r} is reserved for the index; refusing to pull it")
        if name in folders.values():
            other = next(run_id for run_id, folder in folders.items() if folder == name)
            raise InputError(f"{where}: the name {name!r} is also run {other}'s; refusing to let one replace the other")
        folders[run.run_id] = name
    return folders


def replace_folder(fresh: str, target: str, staging: str) -> None:
    """Put the folder `fresh` at `target` by renames; what was at `target` goes into `staging` (removed
    with it), and comes back if the rename fails. A link at `target` is moved, never followed."""
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix="old-", dir=staging)
        old = os.path.join(old, os.path.basename(target))
        os.rename(target, old)
    try:
        os.rename(fresh, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise


def pull(sweep: str, out: str, include_all: bool = False, tracking_uri: str | None = None) -> list[dict]:
    """Download the selected (or all finished) dictionaries of `sweep` into `out`; returns index.json."""
    from dictsweep import load_dictionary

    client, runs = find_sweep(tracking_uri, sweep)
    runs = [run for run in runs if run.tags.get("dictsweep.status") == "finished"]
    if not include_all:
        runs = [run for run in runs if run.tags.get(SELECTED_TAG) == "true"]
    if not runs:
        raise InputError(f"sweep {sweep!r} has no {'finished' if include_all else 'selected'} dictionaries to pull")
    folders = folder_names(sweep, runs)  # every name checked before anything is written
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out {out}: cannot make the folder ({error})") from None
    out = os.path.realpath(out)
    staging = tempfile.mkdtemp(prefix=".pull-", dir=out)  # inside --out: renames stay on one filesystem
    entries = []
    try:
        for run in runs:
            name = folders[run.run_id]
            fresh = download_dictionary(client, run.run_id, os.path.join(staging, name))
            load_dictionary(fresh)  # a folder that does not load never replaces one that did
            replace_folder(fresh, os.path.join(out, name), staging)
            entries.append(
                {
                    "path": name,
                    **point_params(run.params, run.metrics),
                    "selected": run.tags.get(SELECTED_TAG) == "true",
                    "why": run.tags.get(WHY_TAG),
                    "metrics": {
                        **{metric.index_name: None for metric in INDEX_METRICS},
                        **{
                            key.removeprefix("eval/"): value
                            for key, value in run.metrics.items()
                            if key.startswith("eval/")
                        },
                    },
                }
            )
        fs.write_text(os.path.join(out, INDEX_NAME), json.dumps(entries, indent=2))  # a rename: replaces a link
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entries
