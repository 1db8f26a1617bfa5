"""`dictsweep bench train`: SAE-samples/s of a stacked ensemble against per-SAE training.

In one process and on the same batches it times (a) the ensemble with each candidate kernel,
decoder and encoder (each its own trainer), (b) a reference that steps the same K SAEs one at a time, each with its own optimizer (how
per-SAE trainers work), and (c) torch's own matmul at the encoder's shape. Timings are interleaved
in rounds (every candidate once per round, on the same batches) and medians are reported, so a
busy machine slows all of them alike. It checks that ensemble and reference give the same weights.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from dictsweep.config import TrainConfig
from dictsweep.errors import InputError
from dictsweep.sae.ensemble import ARCHITECTURES, Member, build_ensemble
from dictsweep.sae.hyperparameters import K, L1_COEF
from dictsweep.sae.transcoder import is_transcoder
from dictsweep.train.kernels import default_candidates, synchronize, time_steps
from dictsweep.train.loop import DeviceTrainer, EnsembleTrainer, uses_bf16


def bench_members(architecture: str, n_members: int, n_latents: int, k: int = 0) -> list[Member]:
    """K members with distinct seeds and sparsity settings, as a sweep would have."""
    k = k or max(1, min(K.typical, n_latents // 16))
    l1_coef = next(
        (p.typical for p in ARCHITECTURES[architecture].hyperparameters if p.key == "l1_coef"), L1_COEF.typical
    )
    return [Member(lr=1e-3, seed=index, l1_coef=(1.0 + index) * l1_coef, k=k) for index in range(n_members)]


def sparse_batches(d_model: int, batch_rows: int, count: int, seed: int = 0, d_target: int = 0) -> list[torch.Tensor]:
    """Batches of sparse combinations of random directions (activation-like, not white noise); with
    `d_target`, each row's target beside it (the same combination of other directions), as a transcoder
    dataset streams them: `[batch_rows, d_model + d_target]`."""
    generator = torch.Generator().manual_seed(seed)
    n_features = 4 * d_model
    features = torch.nn.functional.normalize(torch.randn(n_features, d_model + d_target, generator=generator), dim=-1)
    batches = []
    for _ in range(count):
        on = torch.rand(batch_rows, n_features, generator=generator) < 8 / n_features
        batches.append((torch.rand(batch_rows, n_features, generator=generator) * on) @ features)
    return batches


def check_d_target(architecture: str, d_target: int) -> None:
    """InputError unless a transcoder has a target width (--d-target > 0) and an SAE none (0)."""
    if is_transcoder(architecture) and d_target <= 0:
        raise InputError(f"--d-target is {d_target}: a transcoder ({architecture}) needs its target's width, > 0")
    if not is_transcoder(architecture) and d_target != 0:
        raise InputError(
            f"--d-target is {d_target}: only a transcoder architecture has a target ({architecture} is an SAE)"
        )


def matmul_seconds(
    batch_rows: int,
    d_model: int,
    n_latents: int,
    n_members: int,
    device: torch.device,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Seconds of torch's own matmul at the encoder's shape, for all K members, in the dtype the
    trainer computes in (bf16 under autocast): the better of one plain mm per member and one bmm."""
    x = torch.randn(batch_rows, d_model, device=device, dtype=dtype)
    weights = torch.randn(n_members, d_model, n_latents, device=device, dtype=dtype)
    stacked_x = x.expand(n_members, batch_rows, d_model).contiguous()

    def seconds(run) -> float:
        run()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize(device)
        return (time.perf_counter() - start) / repeats

    return min(
        seconds(lambda: [x @ weights[i] for i in range(n_members)]), seconds(lambda: torch.bmm(stacked_x, weights))
    )


def bench_train(
    d_model: int,
    n_latents: int,
    batch_rows: int,
    n_members: int,
    steps: int,
    architecture: str = "relu",
    kernels: tuple[str, ...] | None = None,
    reference: bool = True,
    device: str = "cpu",
    warmup: int = 2,
    decodes: tuple[str, ...] = ("auto",),
    rounds: int = 3,
    k: int = 0,
    encodes: tuple[str, ...] = ("auto",),
    d_target: int = 0,
) -> dict:
    """Measure one ensemble shape; returns the JSON-ready result (samples/s are medians over rounds).
    Candidates are named kernel/decode, and kernel/decode/encode when `encodes` is not just auto.
    `d_target`: a transcoder's target width (batches `[B, d_model + d_target]`; 0 for an SAE)."""
    check_d_target(architecture, d_target)
    options = {"d_out": d_target} if d_target else {}
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    members = bench_members(architecture, n_members, n_latents, k)
    # on the device already: the trainer overlaps the copy with the previous step (train/device.py)
    batches = [batch.to(device) for batch in sparse_batches(d_model, batch_rows, steps + warmup, d_target=d_target)]
    total_steps = warmup + steps * rounds
    # one optimizer step a batch: the figures are per step of `batch_rows`, for every architecture; and
    # the steady step: no sparsity warm-up, in which the top-k family keeps 4k latents a row
    config = TrainConfig(
        tokens=batch_rows * total_steps,
        batch_rows=batch_rows,
        step_rows=batch_rows,
        lr_warmup_steps=1,
        l1_warmup_fraction=0,
    )
    samples = n_members * batch_rows  # SAE-samples per step
    dtype = torch.bfloat16 if uses_bf16(config, device) else torch.float32  # the yardstick's matmul

    trainers, warmup_seconds, paths = {}, {}, {}
    for kernel in kernels or default_candidates(device):
        for decode in decodes:
            for encode in encodes:
                name = f"{kernel}/{decode}" + ("" if encodes == ("auto",) else f"/{encode}")
                ensemble = build_ensemble(
                    architecture, d_model, n_latents, members, kernel=kernel, decode=decode, encode=encode, **options
                )
                trainers[name] = trainer = EnsembleTrainer(ensemble, config, total_steps, device)
                paths[name] = (kernel, decode, encode)
                start = time.perf_counter()
                time_steps(trainer, batches[:warmup], warmup)  # builds the compiled kernel
                warmup_seconds[kernel] = time.perf_counter() - start
    if reference:
        singles = [
            EnsembleTrainer(
                build_ensemble(
                    architecture, d_model, n_latents, [member], decode=decodes[0], encode=encodes[0], **options
                ),
                config,
                total_steps,
                device,
            )
            for member in members
        ]
        trainers["reference"] = DeviceTrainer(singles, device)  # one SAE at a time
        time_steps(trainers["reference"], batches[:warmup], warmup)

    seconds = {name: [] for name in [*trainers, "matmul"]}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            seconds[name].append(time_steps(trainer, batches[warmup:], warmup=0))
        seconds["matmul"].append(matmul_seconds(batch_rows, d_model, n_latents, n_members, device, dtype=dtype))
    rate = {name: samples / statistics.median(values) for name, values in seconds.items() if name != "matmul"}
    candidates = {name: rate[name] for name in trainers if name != "reference"}
    best = max(candidates, key=candidates.get)
    kernel, decode, encode = paths[best]

    result = {
        "architecture": architecture,
        "d_model": d_model,
        "d_target": d_target,
        "n_latents": n_latents,
        "k": members[0].k,
        "batch_rows": batch_rows,
        "members": n_members,
        "steps": steps,
        "rounds": rounds,
        "device": str(device),
        "kernel": kernel,
        "decode": decode,
        "encode": encode,
        "sae_samples_per_s": candidates[best],
        "candidates": {name: round(value, 1) for name, value in candidates.items()},
    }
    if "compile" in (kernels or ()):
        result["compile_warmup_seconds"] = warmup_seconds["compile"]  # the warm-up steps, build included
    if reference:
        result["reference_sae_samples_per_s"] = rate["reference"]
        result["speedup_vs_reference"] = candidates[best] / rate["reference"]
        result["max_abs_weight_diff_vs_reference"] = max(
            float((trainers[best].ensemble.W_dec[i] - single.ensemble.W_dec[0]).detach().abs().max())
            for i, single in enumerate(singles)
        )

    # 5 matmuls of 2*B*d*n per member per step: encoder and decoder forward, decoder weight and
    # input gradients, encoder weight gradient (biases ride them); a transcoder's three decoder ones
    # are of its target's width (its skip path is left out). With a sparse decoder, two of
    # them are gathers, and with the sparse encoder a third is a scatter: the figure is then
    # dense-equivalent.
    matmul_flops = 2 * batch_rows * d_model * n_latents * n_members
    d_out = d_target or d_model
    step_flops = 2 * batch_rows * n_latents * n_members * (2 * d_model + 3 * d_out)
    achieved = step_flops * candidates[best] / samples
    matmul_rate = matmul_flops / statistics.median(seconds["matmul"])
    result.update(
        {
            "achieved_gflops": achieved / 1e9,
            "matmul_gflops": matmul_rate / 1e9,
            "matmul_dtype": str(dtype).removeprefix("torch."),
            "fraction_of_matmul_rate": achieved / matmul_rate,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result
