"""Probing and absorption of several dictionaries on one harvested dataset's own tokens: the rows and
labels are read once, the dense probes (the ceiling) fitted once, then each dictionary's latents
are probed (`analysis.probing`, `analysis.absorption`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from dictsweep.analysis.absorption import absorption, ground_truth_probes, word_split
from dictsweep.analysis.config import EvalConfig
from dictsweep.analysis.labels import row_labels, token_table, vocabulary
from dictsweep.analysis.scan import iter_batches, row_key_position
from dictsweep.analysis.probing import Task, mean_over_tasks, probe_accuracies, probing_tasks
from dictsweep.errors import InputError
from dictsweep.sae.export import Dictionary
from dictsweep.store import fs
from dictsweep.store.contexts import read_seqs
from dictsweep.store.dataset import ActivationDataset

ABSORPTION_TEST_FRACTION = 0.2  # of the words (SAEBench splits its vocabulary likewise)
ABSORPTION_ROWS_PER_WORD = 4  # so that a few frequent words do not stand for their letters


class ProbingData(NamedTuple):
    """What every dictionary is probed on."""

    train_x: Tensor  # [rows, d_model] float32, train split
    test_x: Tensor  # [rows, d_model], eval split (held-out contexts)
    tasks: list[Task]
    llm: dict[str, dict[str, float]]  # per task: the dense probes' accuracies
    absorption: dict  # train_x, test_x, train_letters, test_letters (whole-word rows, words split)
    probes: tuple[Tensor, Tensor]  # first-letter probes on the activations: weights [26, d], biases [26]
    notes: list[str]


def probing_source(dataset: ActivationDataset) -> str | None:
    """Why probing cannot run on this dataset (its tokens are unknown), or None."""
    source = dataset.manifest.source or {}
    if not source.get("model"):
        return f"{dataset.uri}/manifest.json names no source model, whose tokenizer gives the labels"
    if not fs.exists(fs.join(dataset.uri, "contexts")):
        return f"{dataset.uri} has no contexts/ (the token ids of its sequences), so its rows have no labels"
    return None


def read_rows(dataset: ActivationDataset, split: str, most: int) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """The first `most` rows of a split (float32), and their `seq` and `pos` columns."""
    parts, keys = [], []
    for batch in iter_batches(dataset, most, most, "cpu", split):
        if not batch.positions:
            raise InputError(
                f"{dataset.uri}: its {split} shards have no seq/pos columns, so their rows cannot be traced to their tokens"
            )
        parts.append(batch.acts)
        keys.append(batch.row_keys.numpy())
    seqs, positions = row_key_position(np.concatenate(keys))
    return torch.cat(parts), seqs, positions


def probing_data(dataset: ActivationDataset, config: EvalConfig, device: str) -> ProbingData:
    """Rows, labels, tasks, the dense probes and the first-letter probes of `dataset`."""
    from dictsweep.store.harvest.tokens import tokenizer_template
    from dictsweep.store.models import load_tokenizer

    tokenizer = load_tokenizer(dataset.manifest.source["model"])
    vocab = vocabulary(tokenizer, tokenizer_template(tokenizer).special_ids)
    table = token_table(vocab)
    read = {split: read_rows(dataset, split, config.probing_rows) for split in ("train", "eval")}
    contexts = read_seqs(dataset.uri, sorted({int(s) for _, seqs, _ in read.values() for s in np.unique(seqs)}))
    rows, labels = {}, {}
    for split, (x, seqs, positions) in read.items():
        rows[split] = (x.to(device), np.array([contexts[int(s)][int(p)] for s, p in zip(seqs, positions)]))
        labels[split] = row_labels(vocab, table, contexts, seqs, positions)
    tasks, notes = probing_tasks(
        labels["train"], labels["eval"], config.first_letters, config.rows_per_task, config.min_examples, config.seed
    )
    train_x, test_x = rows["train"][0], rows["eval"][0]
    llm = probe_accuracies(train_x, test_x, tasks, config.ks, "llm", dense=True)
    # absorption: whole-word rows of both splits, split by word
    x_all = torch.cat([train_x, test_x])
    tokens = np.concatenate([rows["train"][1], rows["eval"][1]])
    letters = np.concatenate([labels["train"]["letter"], labels["eval"]["letter"]])
    train_rows, test_rows = word_split(tokens, letters, ABSORPTION_ROWS_PER_WORD, ABSORPTION_TEST_FRACTION, config.seed)
    words = {
        "train_x": x_all[train_rows],
        "test_x": x_all[test_rows],
        "train_letters": torch.from_numpy(letters[train_rows]).to(device),
        "test_letters": torch.from_numpy(letters[test_rows]).to(device),
    }
    probes = ground_truth_probes(words["train_x"], words["train_letters"]) if len(train_rows) else None
    (train_x, test_x), tasks = compact(train_x, test_x, tasks)
    return ProbingData(train_x, test_x, tasks, llm, words, probes, notes)


def compact(train_x: Tensor, test_x: Tensor, tasks: list[Task]) -> tuple[tuple[Tensor, Tensor], list[Task]]:
    """Only the rows some task uses (each dictionary encodes them: rows x n_latents), tasks re-indexed."""
    kept, positions = [], []
    for x, split in ((train_x, "train"), (test_x, "test")):
        used = np.unique(np.concatenate([getattr(task, split) for task in tasks] or [np.zeros(0, np.int64)]))
        position = np.full(len(x), -1, dtype=np.int64)
        position[used] = np.arange(len(used))
        kept.append(x[torch.from_numpy(used).to(x.device)])
        positions.append(position)
    tasks = [task._replace(train=positions[0][task.train], test=positions[1][task.test]) for task in tasks]
    return (kept[0], kept[1]), tasks


def probe_dictionary(sae: Dictionary, data: ProbingData, config: EvalConfig, device: str) -> dict:
    """One dictionary's sparse probing (SAEBench's `llm`/`sae` categories and per-task details) and
    absorption (its `mean` category and per-letter details, or why it was not measured)."""
    with torch.no_grad():
        train_latents, test_latents = sae.encode(data.train_x).float(), sae.encode(data.test_x).float()
    sae_rows = probe_accuracies(train_latents, test_latents, data.tasks, config.ks, "sae", dense=False)
    details = [{"dataset_name": task.name, **data.llm[task.name], **sae_rows[task.name]} for task in data.tasks]
    settings = {
        "max_k": config.absorption_max_k,
        "f1_jump": 0.03,
        "min_probe_f1": config.min_probe_f1,
        "min_letters": config.min_letters,
        "seed": config.seed,
    }
    if sae.transcoder:  # the letter probes are directions of the input, a transcoder's decoder rows of its target
        scores, letters, why = {}, [], "a transcoder's decoder rows are not in the input space of the letter probes"
    elif data.probes is None:
        scores, letters, why = {}, [], "no whole-word rows"
    else:
        scores, letters, why = absorption(sae, data.absorption, data.probes, settings, device)
    return {
        "sparse_probing": {
            "llm": mean_over_tasks(data.llm) if data.tasks else {},
            "sae": mean_over_tasks(sae_rows) if data.tasks else {},
            "details": details,
        },
        "absorption": {"mean": scores, "details": letters, "not_measured": why},
    }


def probing_metrics(result: dict) -> dict[str, float]:
    """One dictionary's probing and absorption as flat metric keys (SAEBench's names)."""
    return {
        **result["sparse_probing"]["llm"],
        **result["sparse_probing"]["sae"],
        **result["absorption"]["mean"],
    }


def probe_dictionaries(
    dataset: ActivationDataset, dictionaries: dict[str, Dictionary], config: EvalConfig, device: str
) -> tuple[dict[str, dict], list[str]]:
    """Per dictionary, `probe_dictionary`; and notes (tasks left out, or why nothing could run)."""
    why = probing_source(dataset)
    if why is not None:
        return {}, [f"probing skipped: {why}"]
    data = probing_data(dataset, config, device)
    notes = list(data.notes)
    if not data.tasks:
        notes.append(f"no probing task has {config.min_examples} examples per class: sparse probing not measured")
    results = {name: probe_dictionary(sae, data, config, device) for name, sae in dictionaries.items()}
    for name, result in results.items():
        if result["absorption"]["not_measured"]:
            notes.append(f"{name}: absorption not measured: {result['absorption']['not_measured']}")
    return results, notes


BROWSER_METRICS = (  # (file, path of keys, label): what the feature browser's page shows of the evaluations
    (
        "saebench_core.json",
        ("eval_result_metrics", "reconstruction_quality", "explained_variance"),
        "explained variance",
    ),
    ("saebench_core.json", ("eval_result_metrics", "reconstruction_quality", "cossim"), "cosine (x, x_hat)"),
    ("saebench_core.json", ("eval_result_metrics", "shrinkage", "l2_ratio"), "L2 ratio"),
    ("saebench_core.json", ("eval_result_metrics", "sparsity", "l0"), "L0"),
    ("saebench_core.json", ("eval_result_metrics", "model_behavior_preservation", "kl_div_score"), "KL score"),
    ("saebench_core.json", ("eval_result_metrics", "model_performance_preservation", "ce_loss_score"), "CE score"),
    ("saebench_core.json", ("eval_result_metrics", "misc_metrics", "frac_alive"), "alive"),
    ("probing.json", ("sparse_probing", "llm", "llm_test_accuracy"), "probe: dense ceiling"),
    ("probing.json", ("sparse_probing", "sae", "sae_top_1_test_accuracy"), "probe: 1 latent"),
    ("probing.json", ("sparse_probing", "sae", "sae_top_5_test_accuracy"), "probe: 5 latents"),
    ("probing.json", ("absorption", "mean", "mean_absorption_fraction_score"), "absorption fraction"),
    ("probing.json", ("absorption", "mean", "mean_full_absorption_score"), "full absorption"),
)


def evaluation_summary(folder: str) -> list[list]:
    """[label, value] of the evaluations stored beside a dictionary (`dictsweep eval`, a sweep's end),
    for its feature browser; numbers only (the files are read as untrusted), -1 (unmeasured) left out."""
    import json
    import math

    files, rows = {}, []
    for name, path, label in BROWSER_METRICS:
        if name not in files:
            uri = fs.join(folder, name)
            try:
                files[name] = json.loads(fs.read_text(uri)) if fs.exists(uri) else {}
            except ValueError:
                files[name] = {}
        value = files[name]
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value != -1:
            rows.append([label, float(value)])
    return rows
