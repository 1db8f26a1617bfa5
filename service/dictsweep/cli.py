"""`dictsweep ...`: parses arguments, calls the package, prints. No logic of its own."""

from __future__ import annotations

import sys

import typer

from dictsweep.errors import DictsweepError, InputError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Sparse-autoencoder sweeps over language-model activations.")
bench_app = typer.Typer(no_args_is_help=True, help="Throughput and memory benchmarks (table and JSON).")
app.add_typer(bench_app, name="bench")


def _cuda_available() -> bool:
    """Whether a GPU is visible, without importing torch for `--help`."""
    import shutil

    return shutil.which("nvidia-smi") is not None


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
    correlation: float = typer.Option(_SYNTH["correlation"].default,
                                      help=_SYNTH["correlation"].description),
    noise: float = typer.Option(_SYNTH["noise"].default, help=_SYNTH["noise"].description),
    dtype: str = typer.Option(_SYNTH["dtype"].default, help=_SYNTH["dtype"].description),
    seed: int = typer.Option(_SYNTH["seed"].default, help=_SYNTH["seed"].description),
    overwrite: bool = typer.Option(False, help="Replace a dataset that already exists at --out."),
) -> None:
    """Write a synthetic activation dataset with known ground-truth features."""
    from dictsweep.store.synth import synth_dataset

    config = SynthConfig.from_cli(d_model=d_model, n_features=n_features, active=active, rows=rows,
                                  eval_rows=eval_rows, shard_rows=shard_rows, decay=decay,
                                  correlation=correlation, noise=noise, dtype=dtype, seed=seed)
    manifest = synth_dataset(out, config, overwrite=overwrite)
    eval_rows_written = sum(shard.rows for shard in manifest.eval_shards)
    typer.echo(f"wrote {manifest.n_rows} train + {eval_rows_written} eval rows "
               f"({len(manifest.shards)} + {len(manifest.eval_shards)} shards, d_model={manifest.d_model}, "
               f"{manifest.dtype}) to {out}")


def print_result(result: dict, as_json: bool, title: str) -> None:
    """A benchmark's result: one JSON object, or a two-column table."""
    import json

    if as_json:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in result.items():
        table.add_row(name, f"{value:,.3f}" if isinstance(value, float) else str(value))
    Console().print(table)


@bench_app.command("train")
def bench_train_command(
    d_model: int = typer.Option(512, help="Activation width."),
    n_latents: int = typer.Option(4096, help="Dictionary size."),
    batch_rows: int = typer.Option(1024, help="Rows per batch."),
    members: int = typer.Option(8, help="SAEs stacked in the ensemble (K)."),
    steps: int = typer.Option(20, help="Timed steps (after 2 warm-up steps)."),
    architecture: str = typer.Option("relu", help="Architecture of the ensemble."),
    kernel: list[str] = typer.Option([], help="Kernel(s) to time: bmm, loop, compile (default: those auto would try)."),
    reference: bool = typer.Option(True, help="Also time the same SAEs trained one at a time."),
    device: str = typer.Option("cuda" if _cuda_available() else "cpu", help="Device to run on."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """SAE-samples/s of a stacked ensemble vs one-at-a-time training, and peak memory."""
    from dictsweep.sae import ARCHITECTURES
    from dictsweep.train.bench import bench_train

    if architecture not in ARCHITECTURES:
        raise InputError(f"--architecture: {architecture!r} is not one of {sorted(ARCHITECTURES)}")
    result = bench_train(d_model, n_latents, batch_rows, members, steps, architecture,
                         tuple(kernel) or None, reference, device)
    print_result(result, as_json, f"bench train: {architecture} d_model={d_model} n_latents={n_latents}")


def main() -> None:
    """Console entry point. Click reports usage errors itself (exit 2); ours print one line:
    exit 2 for invalid input, 1 for a failure while running."""
    try:
        app()
    except DictsweepError as error:
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
