"""Neuronpedia's import layout, written from `dictsweep inspect`'s data files.

Neuronpedia's exports, which a Neuronpedia instance imports whole (its admin import reads a folder
per model and source), hold one row of its database per JSON line:

    <model id>/<layer>-<source set>/            one folder per dictionary (a Neuronpedia "source")
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl
        features/batch-<n>.jsonl.gz             one Neuron row per latent
        activations/batch-<n>.jsonl.gz          one Activation row per context (tokens and values)
        explanations/                           none: explanations are Neuronpedia's to make

Each dictionary is its own source set (`<set prefix>-<dictionary>`), its source id
`<layer>-<source set>`, the layer the first number in the hook's name unless given.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import math
import os
import re

from dictsweep.errors import InputError
from dictsweep.store import fs

BATCH_LATENTS = 2048  # latents per batch file, as Neuronpedia's own converters write them
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # the creator Neuronpedia's converters default to


def slug(text: str) -> str:
    """A Neuronpedia id: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", str(text).lower())).strip("-")


def number(value) -> float:
    """A finite float for JSON (Neuronpedia's columns hold no NaN)."""
    return float(value) if value is not None and math.isfinite(float(value)) else 0.0


def write_neuronpedia(found: list, inspected: str, folder: str, options: dict) -> None:
    """The layout above for every dictionary of `found` (publish.Entry), under `folder`."""
    from dictsweep.analysis.datafile import read_data_file
    from dictsweep.analysis.publish import sweep_name

    created = datetime.datetime.now(datetime.timezone.utc).isoformat()
    creator = DEFAULT_CREATOR_ID
    if options.get("model_id") is not None:
        fs.folder_name(options["model_id"], "--model-id")  # a folder of the layout: never a path elsewhere
    for entry in found:
        path = fs.join(inspected, entry.name, "latents.parquet")
        if not fs.exists(path):
            raise InputError(
                f"no inspect data for {entry.name} at {path}: run `dictsweep inspect TARGET --data URI "
                f"--out {inspected}` first, or pass --inspect DIR"
            )
        table, meta = read_data_file(path)
        config = json.loads(fs.read_text(fs.join(entry.uri, "cfg.json")))  # loaded by `entries` before
        if table.num_rows != config["d_sae"]:
            raise InputError(f"{path}: {table.num_rows} latents, but {entry.uri} has d_sae={config['d_sae']}")
        names = config.get("metadata", {})  # a dict: `entries` loaded the dictionary
        model = options.get("model_id") or slug(str(names.get("model_name") or meta.get("model") or "").split("/")[-1])
        if not model:
            raise InputError(f"{entry.uri}: cfg.json names no model (metadata.model_name); pass --model-id")
        layer = options.get("layer")
        if layer is None:
            found_layer = re.search(r"\d+", str(names.get("hook_name") or meta.get("hook") or ""))
            if found_layer is None:
                raise InputError(f"{entry.uri}: no layer number in its hook name; pass --layer")
            layer = int(found_layer.group())
        prefix = slug(options.get("source_set") or sweep_name(config, entry.uri) or "dictsweep")
        source_set = f"{prefix}-{slug(entry.name)}"
        source_id = f"{layer}-{source_set}"
        out = os.path.join(folder, model, source_id)
        os.makedirs(os.path.join(out, "explanations"), exist_ok=True)
        rows = {
            "release.jsonl": {
                "name": prefix,
                "description": f"dictsweep sweep {prefix}",
                "descriptionShort": prefix,
                "urls": [],
                "creatorName": "dictsweep",
                "creatorNameShort": "dictsweep",
                "creatorId": creator,
                "visibility": "PUBLIC",
                "createdAt": created,
            },
            "model.jsonl": {
                "id": model,
                "displayName": str(names.get("model_name") or model),
                "displayNameShort": model,
                "creatorId": creator,
                "layers": int(layer) + 1,  # at least; an instance that has the model keeps its own row
                "neuronsPerLayer": int(config["d_in"]),
                "owner": str(names.get("model_name") or model).split("/")[0],
                "visibility": "PUBLIC",
                "instruct": False,
                "createdAt": created,
                "updatedAt": created,
            },
            "sourceset.jsonl": {
                "modelId": model,
                "name": source_set,
                "hasDashboards": True,
                "visibility": "PUBLIC",
                "description": f"{config['architecture']} SAE, {config['d_sae']} latents ({entry.name})",
                "type": "sae",
                "creatorName": "dictsweep",
                "urls": [],
                "creatorId": creator,
                "releaseName": prefix,
                "createdAt": created,
            },
            "source.jsonl": {
                "id": source_id,
                "modelId": model,
                "setName": source_set,
                "hasDashboards": True,
                "visibility": "PUBLIC",
                "creatorId": creator,
                "dataset": str(meta.get("dataset") or names.get("dataset_path") or ""),
                "num_prompts": None,
                "num_tokens_in_prompt": names.get("context_size"),
                "saelensConfig": config,
                "hfRepoId": options.get("hf_repo_id"),
                "hfFolderId": entry.name if options.get("hf_repo_id") else None,
                "notes": f"{meta.get('rows')} tokens inspected by dictsweep",
                "createdAt": created,
            },
        }
        for name, row in rows.items():
            with open(os.path.join(out, name), "w") as file:
                file.write(json.dumps(row) + "\n")
        edges = meta["hist_edges"]  # checked by read_data_file
        latents = table.to_pylist()
        for batch, start in enumerate(range(0, len(latents), BATCH_LATENTS)):
            chunk = latents[start : start + BATCH_LATENTS]
            features = [feature(record, edges, model, source_id, source_set, creator, created) for record in chunk]
            activations = [
                row for record in chunk for row in activation_rows(record, model, source_id, creator, created)
            ]
            for kind, lines in (("features", features), ("activations", activations)):
                os.makedirs(os.path.join(out, kind), exist_ok=True)
                with gzip.open(os.path.join(out, kind, f"batch-{batch}.jsonl.gz"), "wt") as file:
                    file.writelines(json.dumps(line) + "\n" for line in lines)


def feature(record: dict, edges: list, model: str, source_id: str, source_set: str, creator: str, created: str) -> dict:
    """One latent as Neuronpedia's Neuron row: frequency, largest activation, token effects, nearest
    latents by decoder cosine, and the histogram of its activations (bins it fell in: bar values are
    the bins' geometric centres, parallel to the heights)."""
    bins = [(math.sqrt(edges[i] * edges[i + 1]), count) for i, count in enumerate(record["hist"]) if count]
    return {
        "modelId": model,
        "layer": source_id,
        "index": str(record["latent"]),
        "sourceSetName": source_set,
        "creatorId": creator,
        "createdAt": created,
        "maxActApprox": number(record["max_act"]),
        "hasVector": False,
        "vector": [],
        "vectorLabel": None,
        "hookName": None,
        "topkCosSimIndices": [int(item["latent"]) for item in record["neighbours"]],
        "topkCosSimValues": [number(item["cosine"]) for item in record["neighbours"]],
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [],
        "correlated_features_indices": [],
        "correlated_features_pearson": [],
        "correlated_features_l1": [],
        "neg_str": [item["token"] for item in record["suppressed"]],
        "neg_values": [number(item["logit"]) for item in record["suppressed"]],
        "pos_str": [item["token"] for item in record["promoted"]],
        "pos_values": [number(item["logit"]) for item in record["promoted"]],
        "frac_nonzero": number(record["frequency"]),
        "freq_hist_data_bar_heights": [float(count) for _, count in bins],
        "freq_hist_data_bar_values": [number(centre) for centre, _ in bins],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [],
    }


def activation_rows(record: dict, model: str, source_id: str, creator: str, created: str) -> list[dict]:
    """A latent's contexts with their tokens as Neuronpedia's Activation rows (a context without
    tokens, as on synthetic data, has nothing to show there). A token whose activation is unknown
    counts 0; the row's own token carries the context's activation."""
    rows = []
    for position, context in enumerate(record["contexts"]):
        tokens = context.get("tokens") or []
        if not tokens:
            continue
        values = [number(value) for value in (context.get("token_acts") or [None] * len(tokens))]
        center = int(context["center"])
        if 0 <= center < len(values):
            values[center] = max(values[center], number(context["act"]))
        top = max(range(len(values)), key=values.__getitem__)
        key = f"{model}/{source_id}/{record['latent']}/{position}"
        rows.append(
            {
                "id": "c" + hashlib.sha1(key.encode()).hexdigest()[:24],
                "tokens": list(tokens),
                "index": str(record["latent"]),
                "layer": source_id,
                "modelId": model,
                "maxValue": values[top],
                "maxValueTokenIndex": top,
                "minValue": min(values),
                "values": values,
                "creatorId": creator,
                "createdAt": created,
                "dataSource": None,
                "dataIndex": None,
                "dfaValues": [],
                "dfaTargetIndex": None,
                "dfaMaxValue": None,
                "lossValues": [],
                "logitContributions": None,
                "binMin": -1.0 if context["kind"] == "top" else None,
                "binMax": None,
                "binContains": -1.0 if context["kind"] == "top" else None,
                "qualifyingTokenIndex": center if 0 <= center < len(values) else None,
            }
        )
    return rows
