"""`dictsweep publish`: exported dictionaries laid out where researchers share them, as files only.

- `hf`: a Hugging Face model repository as SAELens reads one: a folder per dictionary (`cfg.json`,
  `sae_weights.safetensors`, `sparsity.safetensors`), so that `SAE.from_pretrained("OWNER/REPO",
  "<folder>")` loads it once the folder is pushed; `README.md`, the model card (front matter
  `library_name: saelens`, the sweep's table, how to load); and `index.json`, its paths the folders.
- `neuronpedia`: Neuronpedia's import layout (see neuronpedia.py), from the `dictsweep inspect` data.

TARGET is an exported or pulled folder with `index.json`, or one dictionary (a folder with
`cfg.json`). Everything is written to a scratch folder beside OUT, checked, then renamed to OUT: a
failed publish leaves nothing half written, and OUT is never written over.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import NamedTuple

from dictsweep.errors import InputError
from dictsweep.store import fs

FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")  # what SAELens reads of a folder
CARD_METRICS = (("l0", "L0", ".1f"), ("fvu", "FVU", ".4f"), ("dead_fraction", "dead", ".3f"))
CARD_OPTIONAL = (("loss_recovered", "loss recovered", ".3f"), ("mmcs_ground_truth", "mmcs to ground truth", ".3f"))


class Entry(NamedTuple):
    """One dictionary to publish: its folder name, where it is, and its index.json entry."""

    name: str
    uri: str
    info: dict


def entries(target: str) -> list[Entry]:
    """The dictionaries TARGET holds, each checked by loading it (cfg.json against its tensors)."""
    from dictsweep import load_dictionary

    target = target.rstrip("/") or target
    if fs.exists(fs.join(target, "cfg.json")):
        name = fs.folder_name(os.path.basename(target), f"TARGET {target}")
        found = [Entry(name, target, {"path": name})]
    elif fs.exists(fs.join(target, "index.json")):
        try:
            index = json.loads(fs.read_text(fs.join(target, "index.json")))
            found = [
                Entry(fs.folder_name(item["path"], f"{target}/index.json: entry {number}"), "", item)
                for number, item in enumerate(index)
            ]
        except (ValueError, TypeError, KeyError) as error:
            raise InputError(f"{target}/index.json: expected a list of entries with 'path' ({error})") from None
        found = [entry._replace(uri=fs.join(target, entry.name)) for entry in found]
    else:
        raise InputError(
            f"TARGET {target}: neither a dictionary (cfg.json) nor a folder with index.json; for a sweep "
            f"tracked in MLflow, `dictsweep pull SWEEP --out DIR [--all]` first and publish DIR"
        )
    if not found:
        raise InputError(f"{target}/index.json lists no dictionaries")
    for entry in found:
        load_dictionary(entry.uri)  # InputError naming the file and field of a folder SAELens could not load
    return found


def publish(target: str, out: str, form: str, **options) -> list[str]:
    """Write TARGET's dictionaries to OUT in `form` ("hf" or "neuronpedia"); returns the files written."""
    if form not in ("hf", "neuronpedia"):
        raise InputError(f"--format {form}: expected hf or neuronpedia")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"--out {out} exists and is not an empty folder: publish writes a new one")
    found = entries(target)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}-", dir=parent)
    try:
        if form == "hf":
            write_hf(found, scratch, options.get("repo_id") or f"OWNER/{os.path.basename(os.path.abspath(out))}")
        else:
            from dictsweep.analysis.neuronpedia import write_neuronpedia

            inspected = options.get("inspect") or fs.join(target.rstrip("/"), "inspect")
            write_neuronpedia(found, inspected, scratch, options)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return sorted(os.path.relpath(os.path.join(root, name), out) for root, _, names in os.walk(out) for name in names)


def write_hf(found: list[Entry], folder: str, repo_id: str) -> None:
    """A folder per dictionary with the files SAELens reads, index.json and the model card."""
    for entry in found:
        os.makedirs(os.path.join(folder, entry.name))
        for name in FILES:
            source = fs.join(entry.uri, name)
            if name != "sparsity.safetensors" or fs.exists(source):
                with open(os.path.join(folder, entry.name, name), "wb") as file:
                    file.write(fs.read_bytes(source))
    with open(os.path.join(folder, "index.json"), "w") as file:
        json.dump([entry.info for entry in found], file, indent=2)
    with open(os.path.join(folder, "README.md"), "w") as file:
        file.write(model_card(found, repo_id))


def model_card(found: list[Entry], repo_id: str) -> str:
    """The repository's README.md: front matter the Hub reads, the sweep's table, how to load."""
    configs = {entry.name: json.loads(fs.read_text(fs.join(entry.uri, "cfg.json"))) for entry in found}
    first = configs[found[0].name].get("metadata", {})
    model, hook = first.get("model_name"), first.get("hook_name")
    front = ["---", "library_name: saelens", "tags:", "- sparse-autoencoder", "- saelens", "- dictsweep"]
    if model and "/" in str(model):
        front.append(f"base_model: {model}")
    front.append("---")
    optional = [item for item in CARD_OPTIONAL if any(item[0] in entry.info.get("metrics", {}) for entry in found)]
    headers = ["SAE (folder)", "architecture", "latents", "sparsity", *(label for _, label, _ in CARD_METRICS)]
    headers += [label for _, label, _ in optional] + ["selected"]
    rows = []
    for entry in found:
        config, info, metrics = configs[entry.name], entry.info, entry.info.get("metrics", {})
        cells = [f"`{entry.name}`", config["architecture"], str(config["d_sae"]), sparsity(info, config)]
        for key, _, form in (*CARD_METRICS, *optional):
            cells.append(format(metrics[key], form) if isinstance(metrics.get(key), (int, float)) else "")
        cells.append("yes" if info.get("selected") else "")
        rows.append("| " + " | ".join(cells) + " |")
    sweep = sweep_name(configs[found[0].name], found[0].uri)
    where = f"`{hook}` of `{model}`" if model and hook else "a model's activations"
    lines = [
        *front,
        "",
        f"# Sparse autoencoders on {where}",
        "",
        f"{len(found)} dictionaries{f' of the sweep `{sweep}`' if sweep else ''}, trained with dictsweep; the "
        "metrics are measured on held-out activations (L0: active latents per token; FVU: fraction of variance "
        "unexplained; dead: fraction of latents that never fired).",
        "",
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
        *rows,
        "",
        "Load one with SAELens (the folder name is the SAE id):",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo_id}", "{found[0].name}")',
        "```",
        "",
        "Each folder is in SAELens's format (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`); "
        "`normalize_activations` is `none`: feed raw activations. `index.json` lists every dictionary "
        "with its settings and metrics.",
        "",
    ]
    return "\n".join(lines)


def sweep_name(config: dict, uri: str) -> str | None:
    """The sweep named in cfg.json's `metadata.dictsweep` (untrusted: an object, or absent), or None."""
    ours = config.get("metadata", {}).get("dictsweep") or {}
    if not isinstance(ours, dict):
        raise InputError(f"{uri}/cfg.json: field 'metadata.dictsweep' should be a JSON object (got {ours!r:.80})")
    return ours.get("sweep")


def sparsity(info: dict, config: dict) -> str:
    """The sparsity setting of one dictionary, as its grid set it."""
    if info.get("k") or config.get("k"):
        return f"k={info.get('k') or config.get('k')}"
    if info.get("target_l0"):
        return f"L0 target {info['target_l0']}"
    return f"l1={info['l1_coef']:.3g}" if isinstance(info.get("l1_coef"), (int, float)) else ""
