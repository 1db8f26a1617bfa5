"""Evaluations of finished or exported dictionaries on the dataset they were trained on: SAEBench's core
metrics over the eval rows (`analysis.core`), its KL and CE loss scores from the spliced evaluation
(`sweep.splice`), and sparse probing and first-letter absorption on the dataset's own tokens
(`analysis.evaluation`). A sweep runs it at its end (`sweep.finish`); `dictsweep eval` on exported ones.

Per dictionary it gives the flat metrics (our keys: `eval/<key>` in MLflow, index.json, saes.csv),
SAEBench's core output (`saebench_core.json`, which SAEBench's tooling reads) and the probing
results (`probing.json`: SAEBench's sparse-probing categories `llm` and `sae` with per-task details,
and its absorption category `mean` with per-letter details).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch

from dictsweep.analysis.config import EvalConfig
from dictsweep.errors import InputError
from dictsweep.sae.saebench import core_eval_config, core_output, flat_metrics, with_splice
from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.track_views import EVAL_STEP

CORE_FILE, PROBING_FILE, SUMMARY_FILE = "saebench_core.json", "probing.json", "eval.json"


class Evaluated(NamedTuple):
    """What `evaluate` measured: per dictionary its results, and notes on what could not run."""

    results: dict[str, dict]
    """name -> {"metrics": flat, "core": {"metrics", "details"}, "probing": dict or None}"""
    notes: list[str]
    splice_tokens: int


def evaluate(
    data: str,
    dictionaries: dict[str, str],
    config: EvalConfig,
    device: str = "cpu",
    threads: int = 0,
    rows: int | None = None,
) -> Evaluated:
    """The evaluations of each dictionary (name -> folder or URI) on dataset `data`; the spliced one
    when `config.splice` (a sweep has spliced before and passes splice False), probing when
    `config.probing`. Runs as a Ray task at a sweep's end, or in the CLI's process."""
    from dictsweep import load_dictionary
    from dictsweep.analysis.core import core_results
    from dictsweep.analysis.evaluation import probe_dictionaries, probing_metrics

    torch.set_num_threads(threads or os.cpu_count() or 1)  # a Ray task gets one thread by default
    dataset = ActivationDataset.open(data)
    modules = {name: load_dictionary(uri).to(device) for name, uri in dictionaries.items()}
    notes, spliced, tokens = [], {}, 0
    kinds = {module.transcoder for module in modules.values()}
    if config.splice:
        from dictsweep.sweep.splice import splice_eval, splice_source

        source = splice_source(dataset, transcoders=True in kinds)
        if len(kinds) > 1:  # they replace different hooks' outputs
            notes.append("KL and CE loss scores not measured: evaluate SAEs and transcoders separately to splice them")
        elif isinstance(source, str):
            notes.append(f"KL and CE loss scores not measured: {source}")
        else:
            outcome = splice_eval(data, dictionaries, config.splice_tokens, device, threads)
            spliced, tokens = outcome.metrics, outcome.tokens
    core = core_results(dataset, modules, rows or config.tokens, device)
    probing, probing_notes = probe_dictionaries(dataset, modules, config, device) if config.probing else ({}, [])
    results = {}
    for name in modules:
        metrics = {**flat_metrics(core[name]["metrics"]), **spliced.get(name, {})}
        if name in probing:
            metrics |= probing_metrics(probing[name])
        results[name] = {"metrics": metrics, "core": core[name], "probing": probing.get(name)}
    return Evaluated(results, notes + probing_notes, tokens)


def core_document(
    name: str, sae_cfg: dict, core: dict, metrics: dict, splice_tokens: int, dataset: ActivationDataset, release: str
) -> dict:
    """SAEBench's core output of one dictionary, its spliced categories from `metrics` (the flat ones
    after every spliced evaluation the sweep ran)."""
    from dictsweep import __version__

    source = dataset.manifest.source or {}
    spliced = {key for key in ("kl_div_score", "ce_loss_score") if key in metrics}
    config = core_eval_config(
        model_name=str(source.get("model_name") or source.get("model") or ""),
        llm_dtype=dataset.dtype,
        dataset=str(source.get("dataset") or dataset.uri),
        context_size=context_size(dataset),
        compute_kl="kl_div_score" in spliced,
        compute_ce_loss="ce_loss_score" in spliced,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=not source.get("include_special", False),
    )
    result = {"metrics": with_splice(core["metrics"], metrics, splice_tokens), "details": core["details"]}
    return core_output(result, config, sae_cfg, name, release, f"dictsweep {__version__}")


def context_size(dataset: ActivationDataset) -> int:
    """The tokens per sequence the manifest's free-form `source` names (0 when it names none)."""
    context = (dataset.manifest.source or {}).get("context") or 0
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise InputError(
            f"{dataset.uri}/manifest.json: field 'source.context' should be a whole number of tokens (got {context!r:.80})"
        )
    return context


def write_documents(folder: str, document: dict, probing: dict | None) -> list[str]:
    """`saebench_core.json` (and `probing.json`) into `folder` (a folder or URI); returns their URIs."""
    written = [fs.join(folder, CORE_FILE)]
    fs.write_text(written[0], json.dumps(document, indent=1))
    if probing is not None:
        written.append(fs.join(folder, PROBING_FILE))
        fs.write_text(written[1], json.dumps(probing, indent=1))
    return written


def eval_command(config: EvalConfig) -> tuple[dict[str, dict], list[str]]:
    """`dictsweep eval`: every dictionary of TARGET (as `inspect` takes it) evaluated on `config.data`;
    per dictionary `<out>/<name>/saebench_core.json` and `probing.json`, and `<out>/eval.json` (every
    dictionary's flat metrics and the notes). Returns (name -> flat metrics, notes)."""
    import tempfile

    from dictsweep.analysis.config import InspectConfig
    from dictsweep.analysis.inspect import resolve_device, resolve_targets

    device = resolve_device(config.device)
    with tempfile.TemporaryDirectory() as scratch:
        targets, _ = resolve_targets(
            InspectConfig(target=config.target, data=config.data, tracking_uri=config.tracking_uri), scratch
        )
        context_size(ActivationDataset.open(config.data))  # before the work, not after it
        names = [target.name for target in targets]
        if len(set(names)) != len(names):
            raise InputError(f"TARGET {config.target}: two dictionaries share a name ({sorted(names)})")
        evaluated = evaluate(config.data, {target.name: target.uri for target in targets}, config, device)
        dataset = ActivationDataset.open(config.data)
        release = os.path.basename(config.target.rstrip("/")) or config.target
        for target in targets:
            result = evaluated.results[target.name]
            document = core_document(
                target.name,
                target.sae.cfg,
                result["core"],
                result["metrics"],
                evaluated.splice_tokens,
                dataset,
                release,
            )
            write_documents(fs.join(config.out, target.name), document, result["probing"])
    summary = {name: result["metrics"] for name, result in evaluated.results.items()}
    fs.write_text(
        fs.join(config.out, SUMMARY_FILE), json.dumps({"metrics": summary, "notes": evaluated.notes}, indent=1)
    )
    return summary, evaluated.notes


# -- at the end of a sweep (`sweep.finish`) ----------------------------------------------------------
def evaluate_finished(driver) -> Evaluated | None:
    """Every finished SAE's core metrics (and probing, with `evaluation.probing`) over the sweep's eval
    rows, as a Ray task on the trainers' device kind: added to its metrics and logged to its run as
    `eval/<key>` (the eval metrics it already has, such as l0, stay as measured in training's pass);
    None, with a warning and a tag on the sweep's run, when it fails."""
    import logging

    import ray

    from dictsweep.errors import first_line
    from dictsweep.sweep.finish import finish_device
    from dictsweep.sweep.progress import step

    spec, result, tracker = driver.spec, driver.ledger.result, driver.ledger.tracker
    if not result.finished:
        return None
    uris = {name: r.uri for name, r in sorted(result.finished.items())}
    config = EvalConfig(target=spec.name, data=spec.data.uri, splice=False, probing=spec.evaluation.probing)
    device, threads = finish_device(driver)
    task = ray.remote(evaluate).options(
        num_gpus=int(device == "cuda"), num_cpus=spec.resources.cpus_per_trainer, max_retries=0
    )
    what = "core metrics" + (", probing and absorption" if config.probing else "")
    try:
        context_size(driver.dataset)  # the documents' manifest field, checked before the work
        with step(f"evaluating {len(uris)} dictionaries: SAEBench {what}"):
            evaluated = ray.get(
                task.remote(spec.data.uri, uris, config, device, threads, driver.eval_steps * spec.train.batch_rows)
            )
    except (InputError, ray.exceptions.RayError) as error:  # the SAEs stand with their own eval metrics
        logging.getLogger(__name__).warning(f"evaluation failed, nothing recorded: {first_line(error)}")
        tracker.set_tags(tracker.parent_id, {"dictsweep.evaluation": f"failed: {first_line(error)}"})
        return None
    for note in evaluated.notes:
        logging.getLogger(__name__).info(f"evaluation: {note}")
    for name, measured in evaluated.results.items():
        outcome = result.finished[name]
        new = {key: value for key, value in measured["metrics"].items() if key not in outcome.metrics}
        outcome.metrics.update(new)
        tracker.log_metrics(outcome.run_id, {f"eval/{key}": value for key, value in new.items()}, EVAL_STEP)
    return evaluated


def write_evaluations(driver, evaluated: Evaluated | None) -> None:
    """Each finished SAE's `saebench_core.json` (and `probing.json`) beside its dictionary, so that its
    export carries them, and as artifacts `dictionary/` of its run; after every spliced evaluation."""
    from dictsweep.track import DICTIONARY_PATH

    if evaluated is None:
        return
    spec, result, tracker = driver.spec, driver.ledger.result, driver.ledger.tracker
    for name, measured in evaluated.results.items():
        outcome = result.finished[name]
        document = core_document(
            name,
            json.loads(fs.read_text(fs.join(outcome.uri, "cfg.json"))),
            measured["core"],
            outcome.metrics,
            result.splice_tokens,
            driver.dataset,
            spec.name,
        )
        for uri in write_documents(outcome.uri, document, measured["probing"]):
            tracker.log_bytes(outcome.run_id, fs.read_bytes(uri), os.path.basename(uri), DICTIONARY_PATH)
