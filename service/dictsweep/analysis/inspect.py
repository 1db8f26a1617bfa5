"""`dictsweep inspect`: per-latent statistics, contexts and neighbours of one or more dictionaries
over one pass of a dataset, written as a data file and a static feature browser per dictionary.

TARGET is an exported dictionary (a folder with cfg.json), a pulled or exported folder with
index.json, or a sweep name (its selected dictionaries, fetched from MLflow; the results are then
logged as artifacts `inspect/` of each dictionary's run).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import NamedTuple

import numpy as np
import torch

from dictsweep.analysis.config import SAMPLES, InspectConfig
from dictsweep.analysis.contexts import Request, Source, Window, windows
from dictsweep.analysis.datafile import LatentTables, latent_tables, write_data_file
from dictsweep.analysis.evaluation import evaluation_summary
from dictsweep.analysis.directions import feature_matches, nearest_latents, output_embedding, token_effects
from dictsweep.analysis.scan import ScanResult, row_key_position, scan
from dictsweep.analysis.stats import NO_ROW, Summary
from dictsweep.errors import InputError
from dictsweep.sae.export import Dictionary
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset

DATA_FILE, BROWSER_ENTRY = "latents.parquet", "index.html"


class Target(NamedTuple):
    """One dictionary to inspect."""

    name: str  # its folder name in the output
    uri: str  # where it was read
    sae: Dictionary
    run_id: str | None  # its MLflow run, when it came from a sweep


class InspectResult(NamedTuple):
    """What `inspect` wrote and what the pass cost."""

    folders: dict[str, str]  # dictionary name -> its output folder
    notes: list[str]
    scan: ScanResult


def resolve_targets(config: InspectConfig, scratch: str) -> tuple[list[Target], object | None]:
    """The dictionaries TARGET names, and the MLflow client when they came from a sweep."""
    from dictsweep import load_dictionary

    target = config.target.rstrip("/") or config.target
    if fs.exists(fs.join(target, "cfg.json")):
        return [Target(os.path.basename(target) or target, target, load_dictionary(target), None)], None
    if fs.exists(fs.join(target, "index.json")):
        try:
            entries = json.loads(fs.read_text(fs.join(target, "index.json")))
            paths = [
                fs.folder_name(entry["path"], f"{target}/index.json: entry {number}")
                for number, entry in enumerate(entries)
            ]
        except (ValueError, TypeError, KeyError) as error:
            raise InputError(f"{target}/index.json: expected a list of entries with 'path' ({error})") from None
        if not paths:
            raise InputError(f"{target}/index.json lists no dictionaries")
        return [
            Target(path, fs.join(target, path), load_dictionary(fs.join(target, path)), None) for path in paths
        ], None
    if "/" in target or os.path.exists(target):
        raise InputError(
            f"TARGET {config.target}: neither an exported dictionary (cfg.json) nor a folder with index.json"
        )
    from dictsweep.track import SELECTED_TAG, download_dictionary, find_sweep

    client, runs = find_sweep(config.tracking_uri, target)
    runs = [run for run in runs if run.tags.get(SELECTED_TAG) == "true"]
    if not runs:
        raise InputError(f"sweep {target!r} has no selected dictionaries (has it finished?)")
    targets = []
    for run in runs:
        name = fs.folder_name(run.name, f"sweep {target!r}, run {run.run_id}")  # a name from the tracking server
        folder = download_dictionary(client, run.run_id, os.path.join(scratch, name))
        targets.append(Target(name, folder, load_dictionary(folder), run.run_id))
    return targets, client


def resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no GPU is visible here; use --device cpu or auto")
    return "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)


def inspect(config: InspectConfig) -> InspectResult:
    """Run the pass for every dictionary of TARGET and write their data files and browsers; those
    of a sweep are logged to their runs."""
    with tempfile.TemporaryDirectory() as scratch:
        targets, client = resolve_targets(config, scratch)
        result = inspect_targets(config, targets)
        if client is not None:
            from dictsweep.track import log_inspection

            for target in targets:
                log_inspection(client, target.run_id, result.folders[target.name])
    return result


def inspect_for_sweep(
    uris: dict[str, str], data: str, out: str, tokens: int, device: str, threads: int = 0
) -> list[str]:
    """A finished sweep's `evaluation.inspect`: its selected dictionaries (name -> URI) over `data`,
    written under `out` (a folder or URI); returns the notes. Runs as a Ray task on the sweep's device kind."""
    if threads:
        torch.set_num_threads(threads)
    from dictsweep import load_dictionary

    targets = [Target(name, uri, load_dictionary(uri), None) for name, uri in sorted(uris.items())]
    with tempfile.TemporaryDirectory() as local:
        config = InspectConfig(target=",".join(sorted(uris)), data=data, out=local, tokens=tokens, device=device)
        result = inspect_targets(config, targets)
        fs.copy_folder(local, out)
    return result.notes


def inspect_targets(config: InspectConfig, targets: list[Target]) -> InspectResult:
    """The pass over `config.data` for `targets`, then each one's data file and browser under `config.out`."""
    from dictsweep.analysis.browser import write_browser, write_overview

    dataset = ActivationDataset.open(config.data)
    device = resolve_device(config.device)
    for target in targets:
        d_in = target.sae.W_enc.shape[0]  # what it reads (a transcoder writes its target's width)
        if d_in != dataset.d_model:
            raise InputError(
                f"dictionary {target.uri} has d_in={d_in} but dataset {config.data} has "
                f"d_model={dataset.d_model}: it was trained on other activations"
            )
    dictionaries = {target.name: target.sae for target in targets}
    result = scan(dictionaries, dataset, config.tokens, config.top, SAMPLES, config.batch_rows, device)
    source = Source(dataset, device, load_model=result.keys_are_positions)
    notes = list(source.notes)
    if source.contexts is not None and not result.keys_are_positions:
        notes.append("the rows carry no seq/pos columns: contexts cannot be placed")
    tables = describe(config, dictionaries, result, source, device)
    folders = {}
    for target in targets:
        folder = os.path.join(config.out, target.name)
        os.makedirs(folder, exist_ok=True)
        meta = {
            "dictionary": target.name,
            "dictionary_uri": target.uri,
            "dataset": config.data,
            "rows": result.rows,
            "architecture": target.sae.architecture,
            "n_latents": int(target.sae.W_dec.shape[0]),
            "d_in": dataset.d_model,
            "d_out": int(target.sae.W_dec.shape[1]),
            "model": (dataset.manifest.source or {}).get("model"),
            "hook": source.hook,
            "target_hook": (dataset.manifest.source or {}).get("target_hook") if dataset.d_target else None,
            "notes": notes,
            "dictionaries": sorted(dictionaries),
            "evaluation": evaluation_summary(target.uri),
        }
        write_data_file(os.path.join(folder, DATA_FILE), tables[target.name], meta)
        write_browser(folder, tables[target.name], meta)
        folders[target.name] = folder
    if len(folders) > 1:
        write_overview(config.out, {name: tables[name] for name in folders}, notes)
    return InspectResult(folders, notes, result)


def describe(
    config: InspectConfig, dictionaries: dict[str, Dictionary], result: ScanResult, source: Source, device: str
) -> dict[str, LatentTables]:
    """Every dictionary's per-latent tables: statistics, windows, neighbours, matches, token effects."""
    requests: dict[str, list[Request]] = {}
    kinds: dict[str, list[tuple[int, str, float]]] = {}  # per request: (latent, "top" or quantile label, value)
    with_windows = source.contexts is not None and result.keys_are_positions
    for name, summary in result.summaries.items():
        requests[name], kinds[name] = [], []
        if not with_windows:
            continue
        for latent, rows, values, label in context_rows(summary, config.quantile_contexts):
            seqs, positions = row_key_position(rows)
            for seq, pos, value in zip(seqs, positions, values):
                requests[name].append(Request(latent, int(seq), int(pos), float(value)))
                kinds[name].append((latent, label, float(value)))
    found = windows(source, requests, dictionaries, device) if with_windows else {}
    embedding = output_embedding(source.model) if source.model is not None and config.token_effects else None
    tables = {}
    for name, sae in dictionaries.items():
        W_dec = sae.W_dec.detach().to(device)
        near = nearest_latents(W_dec, config.neighbours)
        others = (
            {
                other: feature_matches(sae, dictionaries[other], config.neighbours)
                for other, other_sae in dictionaries.items()
                if other != name and other_sae.W_dec.shape[0] != sae.W_dec.shape[0]
            }
            if config.neighbours
            else {}
        )
        # through the output embedding: decoder rows (a transcoder's, of its target) of the model's width
        readable = embedding is not None and W_dec.shape[1] == embedding.shape[1]
        effects = token_effects(W_dec, embedding, config.token_effects) if readable else None
        by_latent: dict[int, list[tuple[str, Window]]] = {}
        for (latent, label, _), window in zip(kinds[name], found.get(name, [])):
            by_latent.setdefault(latent, []).append((label, window))
        tables[name] = latent_tables(result.summaries[name], by_latent, near, others, effects, source)
    return tables


def context_rows(summary: Summary, quantiles: int):
    """Per latent: (latent, row keys, values, label) of its top rows ("top"), then of rows drawn from
    its sampled firing rows at evenly spaced quantiles ("q10", "q30", ...)."""
    for latent in range(len(summary.fire_count)):
        keep = summary.top_rows[latent] != NO_ROW
        if keep.any():
            yield latent, summary.top_rows[latent][keep], summary.top_values[latent][keep], "top"
        if not quantiles:
            continue
        sampled = summary.sample_rows[latent] != NO_ROW
        fresh = sampled & ~np.isin(summary.sample_rows[latent], summary.top_rows[latent])
        if not fresh.any():
            continue
        order = np.argsort(summary.sample_values[latent][fresh])  # ascending
        rows, values = summary.sample_rows[latent][fresh][order], summary.sample_values[latent][fresh][order]
        picks = sorted(
            {min(int(fraction * len(rows)), len(rows) - 1) for fraction in (np.arange(quantiles) + 0.5) / quantiles}
        )
        for pick in picks:
            yield latent, rows[pick : pick + 1], values[pick : pick + 1], f"q{round(100 * (pick + 0.5) / len(rows))}"
