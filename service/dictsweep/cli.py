"""`dictsweep ...`: parses arguments, calls the package, prints. No logic of its own."""

from __future__ import annotations

import sys

import typer

from dictsweep.bench_commands import bench_app
from dictsweep.errors import DictsweepError
from dictsweep.render import print_plan, print_sweep, show_logs

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Sparse-autoencoder sweeps over language-model activations.",
)
app.add_typer(bench_app, name="bench")

# typer's rich help prints `<bool>` after a flag, as if it took a value: a flag shows no type (the
# hook exists in recent typer only; older ones, within the pinned range, keep their own help)
_option_type = getattr(typer.core.TyperOption, "display_type_rich", None)
if _option_type is not None:
    typer.core.TyperOption.display_type_rich = lambda option, ctx: None if option.is_flag else _option_type(option, ctx)


def _print_version(asked: bool) -> None:
    if asked:
        from dictsweep import __version__

        typer.echo(f"dictsweep {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
) -> None:
    """Sparse-autoencoder sweeps over language-model activations."""


from dictsweep.store.synth import SynthConfig  # noqa: E402  (light: its fields are the help below)

_SYNTH = SynthConfig.model_fields


@app.command()
def synth(
    out: str = typer.Option(..., help="Where to write the dataset: a folder, file:// or s3:// prefix."),
    d_model: int = typer.Option(_SYNTH["d_model"].default, help=_SYNTH["d_model"].description),
    n_features: int = typer.Option(_SYNTH["n_features"].default, help=_SYNTH["n_features"].description),
    active: float = typer.Option(_SYNTH["active"].default, help=_SYNTH["active"].description),
    rows: int = typer.Option(_SYNTH["rows"].default, help=_SYNTH["rows"].description),
    eval_rows: int = typer.Option(_SYNTH["eval_rows"].default, help=_SYNTH["eval_rows"].description),
    shard_rows: int = typer.Option(_SYNTH["shard_rows"].default, help=_SYNTH["shard_rows"].description),
    decay: float = typer.Option(_SYNTH["decay"].default, help=_SYNTH["decay"].description),
    correlation: float = typer.Option(_SYNTH["correlation"].default, help=_SYNTH["correlation"].description),
    noise: float = typer.Option(_SYNTH["noise"].default, help=_SYNTH["noise"].description),
    dtype: str = typer.Option(_SYNTH["dtype"].default, help=_SYNTH["dtype"].description),
    seed: int = typer.Option(_SYNTH["seed"].default, help=_SYNTH["seed"].description),
    d_target: int = typer.Option(_SYNTH["d_target"].default, help=_SYNTH["d_target"].description),
    overwrite: bool = typer.Option(False, help="Replace a dataset that already exists at --out."),
) -> None:
    """Write a synthetic activation dataset with known ground-truth features."""
    from dictsweep.store.synth import synth_dataset
    from dictsweep.sweep.progress import step

    config = SynthConfig.from_cli(
        d_model=d_model,
        n_features=n_features,
        active=active,
        rows=rows,
        eval_rows=eval_rows,
        shard_rows=shard_rows,
        decay=decay,
        correlation=correlation,
        noise=noise,
        dtype=dtype,
        seed=seed,
        d_target=d_target,
    )
    with step(f"writing {config.rows:,} + {config.eval_rows:,} synthetic rows to {out}"):
        manifest = synth_dataset(out, config, overwrite=overwrite)
    eval_rows_written = sum(shard.rows for shard in manifest.eval_shards)
    typer.echo(
        f"wrote {manifest.n_rows} train + {eval_rows_written} eval rows "
        f"({len(manifest.shards)} + {len(manifest.eval_shards)} shards, d_model={manifest.d_model}, "
        f"{manifest.dtype}) to {out}"
    )


@app.command()
def run(
    spec_path: str = typer.Argument(..., metavar="SPEC.yaml", help="Sweep spec (YAML)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a spec key: --set train.tokens=20000 (repeatable)."
    ),
    address: str = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Print the placement plan and stop."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the sweep's latest unfinished run from its checkpoints."
    ),
    force: bool = typer.Option(
        False, "--force", help="Take the sweep over from a driver that holds its lease but is dead."
    ),
) -> None:
    """Run a sweep here: train every SAE of the grid, select, export, record in MLflow."""
    import shlex

    from dictsweep.spec_file import load_spec
    from dictsweep.errors import Interrupted, RunError
    from dictsweep.sweep.run import run_sweep

    spec = load_spec(spec_path, overrides)
    try:
        outcome = run_sweep(spec, address, plan_only, resume, force)
    except RunError as error:
        if error.result is not None:
            print_sweep(error.result, spec.experiment)
        raise
    except Interrupted as stop:  # say how to go on, in the words the user typed
        again = shlex.join(["dictsweep", "run", spec_path, *(part for o in overrides for part in ("--set", o))])
        raise Interrupted(stop.signum, f"{stop}: {again} --resume") from None
    if plan_only:
        print_plan(outcome)
    else:
        print_sweep(outcome, spec.experiment)


@app.command()
def pull(
    sweep: str = typer.Argument(..., help="Sweep name (its MLflow experiment)."),
    out: str = typer.Option(..., help="Folder to download into."),
    include_all: bool = typer.Option(False, "--all", help="Every finished dictionary, not only the selected."),
    tracking_uri: str = typer.Option(
        None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)."
    ),
) -> None:
    """Download a sweep's selected (or all) dictionaries with index.json."""
    from dictsweep.sweep.pull import pull as pull_sweep

    entries = pull_sweep(sweep, out, include_all, tracking_uri)
    typer.echo(f"pulled {len(entries)} dictionaries of {sweep} into {out} (index.json lists them)")


@app.command()
def submit(
    spec_path: str = typer.Argument(..., metavar="SPEC.yaml", help="Sweep spec (YAML)."),
    address: str = typer.Option(..., help="Ray Jobs API of the cluster, e.g. http://HEAD:8265."),
    overrides: list[str] = typer.Option([], "--set", help="Override a spec key (repeatable)."),
) -> None:
    """Submit a sweep to a Ray cluster as a job; prints the job id."""
    from dictsweep.sweep.jobs import submit as submit_job

    typer.echo(submit_job(spec_path, address, overrides))


@app.command()
def status(
    job_id: str = typer.Argument(..., help="Job id printed by submit."),
    address: str = typer.Option(..., help="Ray Jobs API of the cluster."),
) -> None:
    """A submitted sweep's status."""
    from dictsweep.sweep.jobs import status as job_status

    info = job_status(job_id, address)
    typer.echo(f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="Job id printed by submit."),
    address: str = typer.Option(..., help="Ray Jobs API of the cluster."),
) -> None:
    """What a submitted sweep's driver printed so far."""
    from dictsweep.sweep.jobs import logs as job_logs

    typer.echo(job_logs(job_id, address), nl=False)


@app.command()
def stop(
    job_id: str = typer.Argument(..., help="Job id printed by submit."),
    address: str = typer.Option(..., help="Ray Jobs API of the cluster."),
) -> None:
    """Stop a submitted sweep (finished SAEs stay recorded; `run --resume` can continue it)."""
    from dictsweep.sweep.jobs import stop as stop_job

    typer.echo(f"{job_id}: {'stopping' if stop_job(job_id, address) else 'was not running'}")


from dictsweep.store.harvest import HarvestConfig  # noqa: E402  (light: torch is imported when run)

_HARVEST = HarvestConfig.model_fields


@app.command()
def harvest(
    model: str = typer.Option(..., help=_HARVEST["model"].description),
    hook: list[str] = typer.Option(..., help=_HARVEST["hooks"].description + " Repeat for several."),
    target_hook: list[str] = typer.Option([], help=_HARVEST["target_hooks"].description),
    text: str = typer.Option(..., help=_HARVEST["text"].description),
    out: str = typer.Option(..., help=_HARVEST["out"].description),
    context: int = typer.Option(_HARVEST["context"].default, help=_HARVEST["context"].description),
    max_tokens: int = typer.Option(None, help=_HARVEST["max_tokens"].description),
    dtype: str = typer.Option(_HARVEST["dtype"].default, help=_HARVEST["dtype"].description),
    seed: int = typer.Option(_HARVEST["seed"].default, help=_HARVEST["seed"].description),
    eval_fraction: float = typer.Option(_HARVEST["eval_fraction"].default, help=_HARVEST["eval_fraction"].description),
    shard_rows: int = typer.Option(_HARVEST["shard_rows"].default, help=_HARVEST["shard_rows"].description),
    shuffle_rows: int = typer.Option(_HARVEST["shuffle_rows"].default, help=_HARVEST["shuffle_rows"].description),
    batch_size: int = typer.Option(_HARVEST["batch_size"].default, help=_HARVEST["batch_size"].description),
    include_special: bool = typer.Option(False, help=_HARVEST["include_special"].description),
    text_field: str = typer.Option(_HARVEST["text_field"].default, help=_HARVEST["text_field"].description),
    text_split: str = typer.Option(_HARVEST["text_split"].default, help=_HARVEST["text_split"].description),
    workers: int = typer.Option(_HARVEST["workers"].default, help=_HARVEST["workers"].description),
    device: str = typer.Option(_HARVEST["device"].default, help=_HARVEST["device"].description),
    address: str = typer.Option(None, help=_HARVEST["address"].description),
    model_name: str = typer.Option(None, help=_HARVEST["model_name"].description),
    overwrite: bool = typer.Option(False, help="Replace the dataset(s) or unfinished harvest at --out."),
    progress: bool = typer.Option(True, help="Show a progress bar (tokens/s) on stderr."),
) -> None:
    """Harvest a Hugging Face model's activations at --hook module(s) into activation datasets;
    a rerun of an interrupted harvest resumes it."""
    from dictsweep.store.harvest import harvest as run_harvest

    config = HarvestConfig.from_cli(
        model=model,
        hooks=hook,
        target_hooks=target_hook,
        text=text,
        out=out,
        context=context,
        max_tokens=max_tokens,
        dtype=dtype,
        seed=seed,
        eval_fraction=eval_fraction,
        shard_rows=shard_rows,
        shuffle_rows=shuffle_rows,
        batch_size=batch_size,
        include_special=include_special,
        text_field=text_field,
        text_split=text_split,
        workers=workers,
        device=device,
        address=address,
        model_name=model_name,
    )
    result = run_harvest(config, overwrite=overwrite, progress=progress)
    for hook_name, manifest in result.manifests.items():
        eval_rows = sum(shard.rows for shard in manifest.eval_shards)
        typer.echo(
            f"{hook_name}: {manifest.n_rows} train + {eval_rows} eval rows ({len(manifest.shards)} + "
            f"{len(manifest.eval_shards)} shards, d_model={manifest.d_model}"
            f"{f', d_target={manifest.d_target}' if manifest.d_target else ''}, {manifest.dtype}) "
            f"at {result.prefixes[hook_name]}"
        )
    typer.echo(
        f"{result.n_contexts} contexts of {config.context} tokens; this run fed {result.tokens} tokens "
        f"to the model in {result.seconds:.1f} s ({result.tokens_per_s:,.0f} tokens/s after loading)"
    )


from dictsweep.analysis.config import InspectConfig  # noqa: E402  (light: its fields are the help below)

_INSPECT = InspectConfig.model_fields


@app.command()
def inspect(
    target: str = typer.Argument(..., help=_INSPECT["target"].description),
    data: str = typer.Option(..., help=_INSPECT["data"].description),
    out: str = typer.Option(_INSPECT["out"].default, help=_INSPECT["out"].description),
    tokens: int = typer.Option(None, help=_INSPECT["tokens"].description),
    top: int = typer.Option(_INSPECT["top"].default, help=_INSPECT["top"].description),
    quantile_contexts: int = typer.Option(
        _INSPECT["quantile_contexts"].default, help=_INSPECT["quantile_contexts"].description
    ),
    neighbours: int = typer.Option(_INSPECT["neighbours"].default, help=_INSPECT["neighbours"].description),
    token_effects: int = typer.Option(_INSPECT["token_effects"].default, help=_INSPECT["token_effects"].description),
    batch_rows: int = typer.Option(_INSPECT["batch_rows"].default, help=_INSPECT["batch_rows"].description),
    device: str = typer.Option(_INSPECT["device"].default, help=_INSPECT["device"].description),
    tracking_uri: str = typer.Option(None, help=_INSPECT["tracking_uri"].description),
    as_json: bool = typer.Option(False, "--json", help="Print the pass's timing as one JSON object."),
) -> None:
    """Per-latent statistics, contexts and neighbours of dictionaries over a dataset: a data file and
    a static feature browser (index.html) per dictionary."""
    import json

    from dictsweep.analysis.inspect import inspect as run_inspect

    config = InspectConfig.from_cli(
        target=target,
        data=data,
        out=out,
        tokens=tokens,
        top=top,
        quantile_contexts=quantile_contexts,
        neighbours=neighbours,
        token_effects=token_effects,
        batch_rows=batch_rows,
        device=device,
        tracking_uri=tracking_uri,
    )
    result = run_inspect(config)
    for note in result.notes:
        typer.echo(f"note: {note}")
    for name, folder in result.folders.items():
        typer.echo(f"{name}: {folder}/latents.parquet, {folder}/index.html")
    timing = {
        "rows": result.scan.rows,
        "dictionaries": len(result.folders),
        "seconds": round(result.scan.seconds, 3),
        "cpu_seconds": round(result.scan.cpu_seconds, 3),
        "rows_per_s": round(result.scan.rows_per_s, 1),
        "peak_rss_mb": round(result.scan.peak_rss_mb, 1),
        "peak_device_mb": round(result.scan.peak_device_mb, 1),
    }
    if as_json:
        typer.echo(json.dumps(timing))
    else:
        typer.echo(
            f"pass: {timing['rows']} rows in {timing['seconds']} s ({timing['rows_per_s']:,.0f} rows/s), "
            f"peak RSS {timing['peak_rss_mb']:,.0f} MB"
        )


from dictsweep.analysis.config import EvalConfig  # noqa: E402  (light: its fields are the help below)

_EVAL = EvalConfig.model_fields


@app.command(name="eval")
def eval_(
    target: str = typer.Argument(..., help=_EVAL["target"].description),
    data: str = typer.Option(..., help=_EVAL["data"].description),
    out: str = typer.Option(_EVAL["out"].default, help=_EVAL["out"].description),
    tokens: int = typer.Option(None, help=_EVAL["tokens"].description),
    splice: bool = typer.Option(_EVAL["splice"].default, help=_EVAL["splice"].description),
    splice_tokens: int = typer.Option(_EVAL["splice_tokens"].default, help=_EVAL["splice_tokens"].description),
    probing: bool = typer.Option(_EVAL["probing"].default, help=_EVAL["probing"].description),
    probing_rows: int = typer.Option(_EVAL["probing_rows"].default, help=_EVAL["probing_rows"].description),
    k: list[int] = typer.Option(_EVAL["ks"].default, help=_EVAL["ks"].description),
    min_letters: int = typer.Option(_EVAL["min_letters"].default, help=_EVAL["min_letters"].description),
    device: str = typer.Option(_EVAL["device"].default, help=_EVAL["device"].description),
    tracking_uri: str = typer.Option(None, help=_EVAL["tracking_uri"].description),
    as_json: bool = typer.Option(False, "--json", help="Print every dictionary's metrics as one JSON object."),
) -> None:
    """SAEBench's core metrics (and its core JSON), KL/CE loss scores, sparse probing and first-letter
    absorption of exported dictionaries, on the dataset's eval rows and own tokens."""
    import json

    from dictsweep.sweep.evaluation import eval_command

    config = EvalConfig.from_cli(
        target=target,
        data=data,
        out=out,
        tokens=tokens,
        splice=splice,
        splice_tokens=splice_tokens,
        probing=probing,
        probing_rows=probing_rows,
        ks=k,
        min_letters=min_letters,
        device=device,
        tracking_uri=tracking_uri,
    )
    summary, notes = eval_command(config)
    for note in notes:
        typer.echo(f"note: {note}", err=as_json)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    from dictsweep.render import print_evaluation

    print_evaluation(summary, out)


@app.command()
def publish(
    target: str = typer.Argument(..., help="A folder with index.json (an export or a pull) or one dictionary."),
    out: str = typer.Option(..., help="New folder to write (it must not exist, or be empty)."),
    form: str = typer.Option(..., "--format", help="hf (a Hugging Face repository SAELens loads) or neuronpedia."),
    repo_id: str = typer.Option(None, help="hf: the repository's OWNER/NAME, for the model card's example."),
    inspect_dir: str = typer.Option(
        None, "--inspect", help="neuronpedia: the `dictsweep inspect` output (default: TARGET/inspect)."
    ),
    model_id: str = typer.Option(None, help="neuronpedia: the model's id there (default: from cfg.json)."),
    layer: int = typer.Option(None, help="neuronpedia: the layer number (default: the hook name's first number)."),
    source_set: str = typer.Option(None, help="neuronpedia: source set prefix (default: the sweep's name)."),
    hf_repo_id: str = typer.Option(None, help="neuronpedia: the Hugging Face repository holding the weights."),
) -> None:
    """Lay exported dictionaries out for sharing, as files only (no network): a Hugging Face
    repository that SAELens's from_pretrained reads, or Neuronpedia's import layout."""
    from dictsweep.analysis.publish import publish as run_publish

    written = run_publish(
        target,
        out,
        form,
        repo_id=repo_id,
        inspect=inspect_dir,
        model_id=model_id,
        layer=layer,
        source_set=source_set,
        hf_repo_id=hf_repo_id,
    )
    typer.echo(f"{out}: {len(written)} files ({form})")


def main() -> None:
    """Console entry point. Click reports usage errors itself (exit 2); ours print one line:
    exit 2 for invalid input, 1 for a failure while running."""
    show_logs()
    try:
        app()
    except DictsweepError as error:
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
