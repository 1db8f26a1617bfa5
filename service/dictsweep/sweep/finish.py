"""The end of a sweep, once every SAE is trained: splice every finished dictionary into the source
model (where asked for; or, with `evaluation.splice_selected_only`, the selected ones after the
selection), so that the selection can rank by loss recovered; select; fit the baselines (and
splice them); export the selected dictionaries with index.json, register them, tag every SAE with
why it was or was not selected, log the sweep's metrics and the Pareto plot."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import numpy as np

from dictsweep.errors import RunError, first_line
from dictsweep.store import fs
from dictsweep.stream.streams import Streams
from dictsweep.sweep import throughput
from dictsweep.sweep.driver import Driver
from dictsweep.sweep.plan import GridPoint
from dictsweep.sweep.progress import step
from dictsweep.sweep.results import INDEX_METRICS, BaselineResult, SweepResult
from dictsweep.sweep.evaluation import evaluate_finished, write_evaluations
from dictsweep.sweep.seeds import plot_points, seed_groups, seed_report, select_over_seeds
from dictsweep.track import SELECTED_TAG, WHY_TAG
from dictsweep.track_views import EVAL_STEP

log = logging.getLogger(__name__)


def finish(driver: Driver) -> None:
    """Everything after training, on the driver's records; marks the run complete."""
    spec, ledger = driver.spec, driver.ledger
    tracker, result = ledger.tracker, ledger.result
    if not spec.evaluation.splice_selected_only:
        splice(driver, sorted(result.finished), [])
    evaluated = evaluate_finished(driver)
    groups = seed_groups({name: r.point for name, r in result.finished.items()})
    result.seeds = seed_report(driver, groups)
    choices = select_over_seeds(
        {name: {"n_latents": r.point.n_latents, "metrics": r.metrics} for name, r in result.finished.items()},
        groups,
        spec.select,
        driver.dataset.d_model,
    )
    result.selected = {name for name, choice in choices.items() if choice.selected}
    result.why = {name: choice.why for name, choice in choices.items()}
    result.ruled_out = {name for name, choice in choices.items() if not choice.eligible}
    result.band = spec.select.l0_band(driver.dataset.d_model)
    if spec.baselines:
        with step(f"baselines: fitting {', '.join(spec.baselines)} on the sampled stream"):
            result.baselines = fit_baselines(driver)
    late = sorted(result.selected) if spec.evaluation.splice_selected_only else []
    if late or result.baselines:
        splice(driver, late, result.baselines)
    write_evaluations(driver, evaluated)
    entries = []
    with step(f"exporting {len(result.selected)} dictionaries to {spec.export_dir}", total=len(result.selected)) as bar:
        for name in sorted(result.selected):
            outcome = result.finished[name]
            fs.copy_folder(outcome.uri, fs.join(spec.export_dir, name))
            entries.append(index_entry(name, outcome.point, outcome.metrics, selected=True, why=result.why[name]))
            if spec.export.registry:
                tracker.register(spec.name, outcome.run_id, {**outcome.point.params(), **outcome.metrics})
            bar.advance()
    for name, outcome in result.finished.items():
        tracker.set_tags(
            outcome.run_id, {SELECTED_TAG: str(name in result.selected).lower(), WHY_TAG: result.why[name]}
        )
    log.info(
        f"selected {len(result.selected)} of {len(result.finished)}: per size, the best {spec.select.metric} "
        f"inside L0 [{result.band[0]:.3g}, {result.band[1]:.3g}]"
        if spec.select.per_size == "best"
        else f"selected {len(result.selected)} of {len(result.finished)}: per size, the (L0, {spec.select.metric}) "
        f"front inside L0 [{result.band[0]:.3g}, {result.band[1]:.3g}]"
    )
    fs.write_text(fs.join(spec.export_dir, "index.json"), json.dumps(entries, indent=2))
    inspect_selected(driver)
    summary = {
        "saes_finished": len(result.finished),
        "saes_failed": len(result.failed),
        "saes_selected": len(result.selected),
        **mmcs_between_sizes(result),
    }
    if result.stream:
        summary.update(throughput.summary(result.stream))
        for line in throughput.report_lines(result.stream):
            log.info(line)
        if result.stream["gpu_note"]:
            tracker.set_tags(tracker.parent_id, {"dictsweep.gpu": result.stream["gpu_note"]})
    tracker.log_metrics(tracker.parent_id, summary, 0)
    plot(driver)
    tracker.log_comparison(comparison(result))
    for baseline in result.baselines:
        tracker.end_run(baseline.run_id)
    tracker.end_run(tracker.parent_id, failed=bool(result.failed))
    with step(f"recording in MLflow ({len(tracker.queue)} writes queued)"):
        tracker.flush(patience=600)
    result.tracking_url = tracker.experiment_url()
    ledger.complete()


def comparison(result: SweepResult) -> list[dict]:
    """The sweep's table of dictionaries for its MLflow run: every SAE (then every baseline) with its
    grid point, eval metrics and whether it was selected."""
    rows = [
        {"name": name, "role": "sae", **r.point.params(), **r.metrics, "selected": name in result.selected}
        for name, r in sorted(result.finished.items())
    ]
    rows += [
        {
            "name": b.name,
            "role": "baseline",
            "architecture": b.kind,
            "n_latents": b.n_atoms,
            "k": b.k,
            **b.metrics,
            "selected": False,
        }
        for b in result.baselines
    ]
    return rows


# -- baselines, spliced evaluation and the Pareto plot (`baselines`, `evaluation`) -----------------------
def fit_baselines(driver: Driver) -> list[BaselineResult]:
    """Baselines fitted on the sampled stream, matched to the selected SAEs' L0, evaluated,
    exported and recorded in MLflow (read back from storage when a resumed sweep did it before)."""
    import ray

    from dictsweep.sweep.baselines import fit_baselines as fit

    spec, result, tracker = driver.spec, driver.ledger.result, driver.ledger.tracker
    saved = fs.join(driver.storage, "baselines", "results.json")
    if not spec.baselines:
        return []
    if fs.exists(saved):
        return [BaselineResult(**baseline) for baseline in json.loads(fs.read_text(saved))]
    driver.start_baseline_feed(None)  # every wave finished before this driver (a resume)
    feed, streams = driver.baseline_feed, Streams(spec, driver.dataset, driver.total_steps, driver.eval_steps)

    def batch(index: int):  # a planned batch no trainer got; only the sampler holds on to its windows
        streams.advance(node, "train", index)
        return streams.pieces(node, "train", index)

    try:
        node = ray.get(feed.actor.status.remote())["node"] if not feed.error else None
        feed.drain(batch)
        if not feed.error:  # what the sampler cost beside the trainers, and how far it lagged
            tracker.log_metrics(
                tracker.parent_id,
                {
                    "baselines.sampler_seconds": ray.get(feed.actor.status.remote())["busy_seconds"],
                    "baselines.feed_most_waiting": feed.most_waiting,
                },
                0,
            )
    except ray.exceptions.RayError as error:
        feed.fail(error)
    finally:
        streams.close()
        ray.kill(feed.actor, no_restart=True)
    device, threads = finish_device(driver)
    try:
        if feed.error:
            raise RunError(feed.error)
        task = ray.remote(fit).options(
            num_gpus=int(device == "cuda"), num_cpus=spec.resources.cpus_per_trainer, max_retries=0
        )
        baselines = [
            BaselineResult(**baseline)
            for baseline in ray.get(
                task.remote(
                    fs.join(driver.storage, "baselines", "state.pt"),
                    spec.baselines,
                    [result.finished[name].metrics["l0"] for name in sorted(result.selected)],
                    spec.data.uri,
                    driver.eval_steps * spec.train.batch_rows,
                    spec.train.batch_rows,
                    baseline_metadata(driver),
                    driver.storage,
                    driver.ground_truth,
                    device,
                    threads,
                )
            )
        ]
    except (RunError, ray.exceptions.RayError) as error:  # the SAEs stand without their baselines
        log.warning(f"baselines failed, none recorded: {first_line(error)}")
        tracker.set_tags(tracker.parent_id, {"dictsweep.baselines": f"failed: {first_line(error)}"})
        return []
    for baseline in baselines:
        run = tracker.start_sae(
            baseline.name,
            {
                "kind": baseline.kind,
                "k": baseline.k,
                "n_atoms": baseline.n_atoms,
                "dataset": spec.data.uri,
                **baseline.fit,
            },
            role="baseline",
        )
        tracker.log_metrics(run, {f"eval/{key}": value for key, value in baseline.metrics.items()}, 0)
        tracker.log_folder(run, lambda local, uri=baseline.uri: fs.download_folder(uri, local))
        baseline.run_id = run
    tracker.flush()
    fs.write_text(saved, json.dumps([asdict(baseline) for baseline in baselines], indent=1))
    return baselines


def baseline_metadata(driver: Driver) -> dict:
    """Export metadata of a baseline: the SAEs' (`metadata`) without a grid point."""
    from dictsweep.store.models import export_names

    source = driver.dataset.manifest.source or {}
    return {
        **export_names(source),
        "dataset_path": driver.spec.data.uri,
        "context_size": source.get("context"),
        "dictsweep": {"sweep": driver.spec.name, "tokens": driver.spec.train.tokens},
    }


def splice(driver: Driver, names: list[str], baselines: list[BaselineResult]) -> dict[str, dict]:
    """Loss recovered of the finished SAEs `names` (and the baselines) spliced into the dataset's
    source model, logged to their runs and added to their metrics; {} with a printed note where it
    cannot run (synthetic data)."""
    import ray

    from dictsweep.sweep.splice import splice_eval, splice_source

    spec, result, tracker = driver.spec, driver.ledger.result, driver.ledger.tracker
    runs = {name: result.finished[name].run_id for name in names}
    uris = {name: result.finished[name].uri for name in runs}
    if spec.evaluation.splice_baselines:
        runs.update({baseline.name: baseline.run_id for baseline in baselines})
        uris.update({baseline.name: baseline.uri for baseline in baselines})
    source = splice_source(driver.dataset, bool(driver.target))
    if not spec.evaluation.splice or not uris or isinstance(source, str):
        if spec.evaluation.splice and isinstance(source, str):  # synthetic data: expected, not a warning
            (log.info if driver.dataset.manifest.ground_truth is not None else log.warning)(
                f"spliced evaluation skipped: {source}"
            )
            tracker.set_tags(tracker.parent_id, {"dictsweep.splice": f"skipped: {source}"})
        return {}
    device, threads = finish_device(driver)
    task = ray.remote(splice_eval).options(
        num_gpus=int(device == "cuda"), num_cpus=spec.resources.cpus_per_trainer, max_retries=0
    )
    try:
        with step(f"splicing {len(uris)} dictionaries into {source.model} at {source.hook}"):
            outcome = ray.get(task.remote(spec.data.uri, uris, spec.evaluation.splice_tokens, device, threads))
    except ray.exceptions.RayError as error:  # e.g. the source model is not loadable here
        log.warning(f"spliced evaluation skipped: {first_line(error)}")
        tracker.set_tags(tracker.parent_id, {"dictsweep.splice": f"skipped: {first_line(error)}"})
        return {}
    result.splice_tokens = outcome.tokens
    tracker.set_tags(
        tracker.parent_id,
        {
            "dictsweep.splice": f"{outcome.kind} from the {outcome.head}, "
            f"{outcome.tokens} tokens of {outcome.contexts} held-out contexts"
        },
    )
    for name, metrics in outcome.metrics.items():
        tracker.log_metrics(
            runs[name],
            {f"eval/{key}": value for key, value in metrics.items()},
            EVAL_STEP,
        )
        if name in result.finished:
            result.finished[name].metrics.update(metrics)
    for baseline in baselines:
        baseline.metrics.update(outcome.metrics.get(baseline.name, {}))
    return outcome.metrics


def inspect_selected(driver: Driver) -> None:
    """`evaluation.inspect`: `dictsweep inspect` over the selected dictionaries, into the export folder's
    `inspect/` and as artifacts `inspect/` of each one's run; a printed note where it cannot run."""
    import ray

    from dictsweep.analysis.inspect import inspect_for_sweep

    spec, result, tracker = driver.spec, driver.ledger.result, driver.ledger.tracker
    if not spec.evaluation.inspect or not result.selected:
        return
    uris = {name: result.finished[name].uri for name in sorted(result.selected)}
    out = fs.join(spec.export_dir, "inspect")
    device, threads = finish_device(driver)
    log.info(f"inspecting {len(uris)} dictionaries over at most {spec.evaluation.inspect_tokens} rows ...")
    task = ray.remote(inspect_for_sweep).options(
        num_gpus=int(device == "cuda"), num_cpus=spec.resources.cpus_per_trainer, max_retries=0
    )
    try:
        notes = ray.get(task.remote(uris, spec.data.uri, out, spec.evaluation.inspect_tokens, device, threads))
    except ray.exceptions.RayError as error:  # the SAEs stand without their browsers
        log.warning(f"inspect failed, nothing recorded: {first_line(error)}")
        tracker.set_tags(tracker.parent_id, {"dictsweep.inspect": f"failed: {first_line(error)}"})
        return
    for note in notes:
        log.info(f"inspect: {note}")
    for name in uris:
        tracker.log_folder(
            result.finished[name].run_id,
            lambda local, uri=fs.join(out, name): fs.download_folder(uri, local),
            "inspect",
        )


def finish_device(driver: Driver) -> tuple[str, int]:
    """Where end-of-sweep work runs (the trainers' device kind, now free) and its torch threads
    (0: every core of the node it lands on)."""
    plan = driver.plan
    devices = {t.device for wave in plan.waves for t in wave} | {z.device for z in plan.zero}
    return "cuda" if "cuda" in devices else "cpu", driver.spec.resources.torch_threads


def plot(driver: Driver) -> None:
    """The Pareto plot: `pareto.png` in the export folder and on the sweep's run."""
    from dictsweep.sweep.report import pareto_plot

    result, tracker = driver.ledger.result, driver.ledger.tracker
    saes = plot_points(result, seed_groups({name: r.point for name, r in result.finished.items()}))
    baselines = [{"kind": b.kind, "k": b.k, "l0": b.metrics["l0"], "fvu": b.metrics["fvu"]} for b in result.baselines]
    png = pareto_plot(saes, baselines, title=f"{driver.spec.name}: eval L0 against FVU", band=result.band)
    fs.write_bytes(fs.join(driver.spec.export_dir, "pareto.png"), png)
    tracker.log_bytes(tracker.parent_id, png, "pareto.png")


def mmcs_between_sizes(result: SweepResult) -> dict[str, float]:
    """MMCS between consecutive dictionary sizes of each architecture, both ways.

    Each size is represented by its finished dictionary whose eval L0 is nearest the architecture's
    median, so that the comparison is at like sparsity.
    """
    from dictsweep import load_dictionary
    from dictsweep.sae.metrics import mmcs

    metrics = {}
    for architecture in sorted({r.point.architecture for r in result.finished.values()}):
        runs = {n: r for n, r in result.finished.items() if r.point.architecture == architecture}
        median_l0 = float(np.median([r.metrics["l0"] for r in runs.values()]))
        by_size = {}
        for name, run in sorted(runs.items()):
            size, best = run.point.n_latents, by_size.get(run.point.n_latents)
            if best is None or abs(run.metrics["l0"] - median_l0) < abs(best.metrics["l0"] - median_l0):
                by_size[size] = run
        sizes = sorted(by_size)
        for small, large in zip(sizes, sizes[1:]):
            forward, backward = mmcs(
                load_dictionary(by_size[small].uri).W_dec, load_dictionary(by_size[large].uri).W_dec
            )
            metrics[f"mmcs_sizes.{architecture}.n{small}_in_n{large}"] = forward
            metrics[f"mmcs_sizes.{architecture}.n{large}_in_n{small}"] = backward
    return metrics


def index_entry(name: str, point: GridPoint, metrics: dict, selected: bool, why: str | None = None) -> dict:
    """One entry of index.json (DESIGN.md): folder, grid point, selected and why, eval metrics (the
    DESIGN's keys always, null where not measured, then any others measured, such as loss_recovered)."""
    return {
        "path": name,
        **point.params(),
        "selected": selected,
        "why": why,
        "metrics": {**{metric.index_name: metrics.get(metric.key) for metric in INDEX_METRICS}, **metrics},
    }
