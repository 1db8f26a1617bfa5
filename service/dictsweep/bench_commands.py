"""`dictsweep bench ...`: the throughput and memory benchmarks' commands (each prints a table, or
one JSON object with --json). Parses arguments and calls the package, as `cli` does."""

from __future__ import annotations

import typer

from dictsweep.errors import InputError
from dictsweep.render import print_result

bench_app = typer.Typer(no_args_is_help=True, help="Throughput and memory benchmarks (table and JSON).")


def cuda_available() -> bool:
    """Whether a GPU is visible, without importing torch for `--help`."""
    import shutil

    return shutil.which("nvidia-smi") is not None


@bench_app.command("train")
def bench_train_command(
    d_model: int = typer.Option(512, help="Activation width."),
    n_latents: int = typer.Option(4096, help="Dictionary size."),
    batch_rows: int = typer.Option(1024, help="Rows per batch."),
    members: int = typer.Option(8, help="SAEs stacked in the ensemble (K)."),
    steps: int = typer.Option(20, help="Timed steps per round (after 2 warm-up steps)."),
    rounds: int = typer.Option(3, help="Rounds: every candidate is timed once per round; medians are reported."),
    architecture: str = typer.Option("relu", help="Architecture of the ensemble: relu, topk, batchtopk, jumprelu."),
    k: int = typer.Option(0, help="Active latents per row for topk and batchtopk (0: min(32, n_latents / 16))."),
    d_target: int = typer.Option(
        0, help="A transcoder's target width: batches of d_model + d_target columns (0: an SAE; transcoders need > 0)."
    ),
    kernel: list[str] = typer.Option([], help="Kernel(s) to time: bmm, loop, compile (default: those auto would try)."),
    decode: list[str] = typer.Option(["auto"], help="Decoder(s) of the top-k family to time: dense, sparse, auto."),
    encode: list[str] = typer.Option(
        ["auto"], help="Encoder(s) of the top-k family to time: dense, sparse, sparse-chunked, sparse-csr, auto."
    ),
    reference: bool = typer.Option(True, help="Also time the same SAEs trained one at a time."),
    device: str = typer.Option("cuda" if cuda_available() else "cpu", help="Device to run on."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """SAE-samples/s of a stacked ensemble vs one-at-a-time training, and peak memory."""
    from dictsweep.sae import ARCHITECTURES
    from dictsweep.sae.ensemble import ENCODES
    from dictsweep.train.bench import bench_train
    from dictsweep.train.kernels import KERNELS

    if architecture not in ARCHITECTURES:
        raise InputError(f"--architecture: {architecture!r} is not one of {sorted(ARCHITECTURES)}")
    for name in kernel:
        if name not in KERNELS:
            raise InputError(f"--kernel: {name!r} is not one of {list(KERNELS)}")
    for name in decode:
        if name not in ("auto", "dense", "sparse"):
            raise InputError(f"--decode: {name!r} is not one of auto, dense, sparse")
    for name in encode:
        if name not in ENCODES:
            raise InputError(f"--encode: {name!r} is not one of {', '.join(ENCODES)}")
    import torch

    cuda = torch.cuda.is_available()
    if device not in ("cpu", "cuda") or (device == "cuda" and not cuda):
        raise InputError(f"--device: {device!r} is not available here (choose from: cpu{', cuda' if cuda else ''})")
    result = bench_train(
        d_model,
        n_latents,
        batch_rows,
        members,
        steps,
        architecture,
        tuple(kernel) or None,
        reference,
        device,
        decodes=tuple(decode),
        rounds=rounds,
        k=k,
        encodes=tuple(encode),
        d_target=d_target,
    )
    print_result(result, as_json, f"bench train: {architecture} d_model={d_model} n_latents={n_latents}")


@bench_app.command("sweep")
def bench_sweep_command(
    spec_path: str = typer.Argument(..., metavar="SPEC.yaml", help="Sweep spec (YAML)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a spec key: --set train.tokens=20000 (repeatable)."
    ),
    address: str = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)."),
    compare: bool = typer.Option(
        False, "--compare", help="Then time the sweep's ensembles with bench train here, with the trainers' kernels."
    ),
    steps: int = typer.Option(10, help="With --compare: timed steps per round of bench train."),
    rounds: int = typer.Option(3, help="With --compare: rounds of bench train (medians)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Run a sweep as `run` does, then its training phase's SAE-samples/s, data wait, GPU busy time and
    utilisation, and its ensembles' shapes (with --compare, their bench train rate on this device)."""
    import contextlib
    import sys

    from dictsweep.spec_file import load_spec
    from dictsweep.sweep.run import run_sweep
    from dictsweep.sweep.throughput import bench_train_equivalent, sweep_report

    spec = load_spec(spec_path, overrides)
    if steps < 1 or rounds < 1:
        raise InputError(f"--steps and --rounds must be at least 1, got {steps} and {rounds}")
    # with --json, stdout holds the JSON alone: the sweep's own output goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        result = run_sweep(spec, address)
        if not result.stream:
            raise InputError(f"{spec_path}: no SAE trained on a trainer actor (all under ZeRO): nothing to report")
        report = {"name": spec.name, "saes": len(result.finished), **sweep_report(result.stream)}
        if compare:
            report.update(bench_train_equivalent(result.stream, steps, rounds))
    print_result(report, as_json, f"bench sweep: {spec.name}")


@bench_app.command("ica")
def bench_ica_command(
    rows: int = typer.Option(200_000, help="Rows of the synthetic mixture."),
    dim: int = typer.Option(256, help="Independent sources, and the width they are mixed into."),
    tol: float = typer.Option(1e-4, help="Stop when the unmixing changes less than this (both fits)."),
    max_iter: int = typer.Option(200, help="Most fixed-point iterations (both fits)."),
    batch_rows: int = typer.Option(65_536, help="Rows per batch of the torch fit's passes."),
    sklearn: bool = typer.Option(True, help="Also fit scikit-learn's FastICA (CPU) on the same data."),
    device: str = typer.Option("cuda" if cuda_available() else "cpu", help="Device of the torch fit."),
    seed: int = typer.Option(0, help="Seed of the mixture and of the shared initial unmixing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Torch FastICA vs scikit-learn's on one mixture: seconds, iterations, source recovery."""
    import importlib.util

    from dictsweep.train.bench_baselines import bench_ica

    if sklearn and importlib.util.find_spec("sklearn") is None:
        raise InputError("--sklearn needs scikit-learn: pip install scikit-learn, or pass --no-sklearn")

    result = bench_ica(rows, dim, tol, max_iter, device, sklearn, batch_rows, seed)
    print_result(result, as_json, f"bench ica: {rows} x {dim}")


@bench_app.command("stream")
def bench_stream_command(
    uri: str = typer.Option(..., help="Dataset prefix (folder, file:// or s3://)."),
    readers: int = typer.Option(4, help="Reader actors (each fetches a window's shards concurrently)."),
    batch_rows: int = typer.Option(4096, help="Rows per batch of the stream."),
    shuffle_shards: int = typer.Option(4, help="Shards mixed in the shuffle buffer."),
    consumers: int = typer.Option(1, help="Trainer-like consumers on this node, each taking every batch (as GPUs do)."),
    windows: int = typer.Option(3, help="Windows (shuffle buffers) held per node: how far the readers work ahead."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """MB/s and rows/s of the readers and of the stream per consumer, beside a plain concurrent GET."""
    from dictsweep.stream.bench import bench_stream

    for name, value in (
        ("--readers", readers),
        ("--batch-rows", batch_rows),
        ("--shuffle-shards", shuffle_shards),
        ("--consumers", consumers),
        ("--windows", windows),
    ):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    print_result(
        bench_stream(uri, readers, batch_rows, shuffle_shards, consumers, windows), as_json, f"bench stream: {uri}"
    )


@bench_app.command("driver")
def bench_driver_command(
    trainers: int = typer.Option(8, help="Idle trainer actors the driver feeds (one per GPU of a sweep)."),
    steps: int = typer.Option(200, help="Batches handed to each trainer."),
    in_flight: int = typer.Option(8, help="Batches queued per trainer (stream.batches_in_flight)."),
    address: str = typer.Option(None, help="Ray cluster to run on (default: a local Ray)."),
    tracking_uri: str = typer.Option(
        None, help="Also time MLflow log_batch writes (one per SAE and curve point) there."
    ),
    writes: int = typer.Option(200, help="log_batch writes timed with --tracking-uri."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Batches per second one sweep driver hands out (its ceiling), and MLflow writes per second."""
    from dictsweep.sweep.bench_driver import bench_driver, bench_tracking

    for name, value in (("--trainers", trainers), ("--steps", steps), ("--in-flight", in_flight), ("--writes", writes)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    result = bench_driver(trainers, steps, in_flight, address)
    if tracking_uri:
        result.update(bench_tracking(tracking_uri, writes))
    print_result(result, as_json, "bench driver")


@bench_app.command("inspect")
def bench_inspect_command(
    uri: str = typer.Option(..., help="Dataset prefix (a harvest, with contexts/, for the whole inspect)."),
    n_latents: int = typer.Option(16384, help="Latents of the bench dictionary."),
    tokens: int = typer.Option(None, help="Most rows read (default: all train rows)."),
    batch_rows: int = typer.Option(1024, help="Rows per batch of the pass."),
    firing: float = typer.Option(0.005, help="Fraction of rows each bench latent fires on."),
    top: int = typer.Option(20, help="Top contexts per latent."),
    device: str = typer.Option("cuda" if cuda_available() else "cpu", help="Device to run on."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Rows/s and peak memory of the inspect pass (every per-latent statistic) for one dictionary."""
    from dictsweep.analysis.bench import bench_inspect

    result = bench_inspect(uri, n_latents, tokens, batch_rows, device, firing, top)
    print_result(result, as_json, f"bench inspect: {n_latents} latents on {uri}")


@bench_app.command("eval")
def bench_eval_command(
    uri: str = typer.Option(..., help="Dataset prefix (a harvest, with contexts/, for probing too)."),
    n_latents: int = typer.Option(4096, help="Latents of the SAE."),
    k: int = typer.Option(32, help="Active latents per row (topk) of the trained and of the bench dictionary."),
    tokens: int = typer.Option(2_000_000, help="Training tokens per SAE (the sweep's train.tokens)."),
    eval_rows: int = typer.Option(None, help="Eval rows of the core pass (the sweep's eval_tokens; default: all)."),
    probing: bool = typer.Option(True, help="Time probing and absorption too (evaluation.probing)."),
    device: str = typer.Option("cuda" if cuda_available() else "cpu", help="Device to run on."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Seconds of the end-of-sweep evaluation per SAE beside its training, and their ratio."""
    from dictsweep.sweep.bench_eval import bench_eval

    result = bench_eval(uri, n_latents, k, tokens, eval_rows, probing, device)
    print_result(result, as_json, f"bench eval: {n_latents} latents on {uri}")


@bench_app.command("recovery")
def bench_recovery_command(
    d_model: int = typer.Option(128, help="Width of the synthetic activations."),
    n_features: int = typer.Option(512, help="Ground-truth features."),
    decay: float = typer.Option(0.99, help="Feature i fires with probability proportional to decay**i."),
    active: float = typer.Option(10.0, help="Mean features active in a row."),
    seed: int = typer.Option(0, help="Seed of the synthetic dataset."),
    d_target: int = typer.Option(
        0, help="A synthetic transcoder dataset: targets of this width, for the transcoder architectures."
    ),
    architecture: list[str] = typer.Option(["relu", "topk"], help="Architecture(s) to train."),
    sizes: list[float] = typer.Option([1.0, 2.0], help="Dictionary sizes as multiples of the feature count."),
    sparsity: list[float] = typer.Option([], help="k (top-k family) or L0 targets (default: active, 2 x active)."),
    tokens: int = typer.Option(1_048_576, help="Training tokens per SAE."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Mean max cosine to the ground truth of SAEs trained with the defaults (only sizes and k or L0
    targets set) on a synthetic dataset, and the best at or above the feature count."""
    from dictsweep.sae import ARCHITECTURES
    from dictsweep.sae.transcoder import trains_transcoders
    from dictsweep.store.synth import SynthConfig
    from dictsweep.sweep.recovery import bench_recovery

    for name in architecture:
        if name not in ARCHITECTURES:
            raise InputError(f"--architecture: {name!r} is not one of {sorted(ARCHITECTURES)}")
    if trains_transcoders(architecture) and d_target <= 0:
        raise InputError("--architecture: transcoders need a synthetic transcoder dataset: pass --d-target")
    if any(multiple <= 0 for multiple in sizes):
        raise InputError(f"--sizes must be positive multiples of --n-features, got {sizes}")
    if any(value <= 0 for value in sparsity):
        raise InputError(f"--sparsity must be positive, got {sparsity}")
    synth = SynthConfig.from_cli(
        d_model=d_model, n_features=n_features, decay=decay, active=active, rows=tokens, seed=seed, d_target=d_target
    )
    if threads:
        import torch

        torch.set_num_threads(threads)
    result = bench_recovery(synth, architecture, sizes, sparsity, tokens)
    print_result(
        result, as_json, f"bench recovery: d_model={d_model} n_features={n_features} decay={decay} active={active}"
    )
