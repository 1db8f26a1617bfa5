"""`dictsweep bench train`: SAE-samples/s of a stacked ensemble against per-SAE training.

In one process and on the same batches it times (a) the ensemble with each candidate kernel and
(b) a reference that steps the same K SAEs one at a time, each with its own optimizer (how
per-SAE trainers work), checks that both give the same weights, and relates the ensemble's
achieved FLOP rate to torch's own matmul rate at these shapes.
"""

from __future__ import annotations

import resource
import time

import torch

from dictsweep.config import TrainConfig
from dictsweep.sae.ensemble import Member, build_ensemble
from dictsweep.train.kernels import default_candidates, synchronize, time_steps
from dictsweep.train.loop import DeviceTrainer, EnsembleTrainer


def bench_members(architecture: str, n_members: int, n_latents: int) -> list[Member]:
    """K members with distinct seeds and sparsity settings, as a sweep would have."""
    return [Member(lr=1e-3, seed=index, l1_coef=1.0 + index, k=max(1, min(32, n_latents // 16)))
            for index in range(n_members)]


def sparse_batches(d_model: int, batch_rows: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Batches of sparse combinations of random directions (activation-like, not white noise)."""
    generator = torch.Generator().manual_seed(seed)
    n_features = 4 * d_model
    features = torch.nn.functional.normalize(torch.randn(n_features, d_model, generator=generator), dim=-1)
    batches = []
    for _ in range(count):
        on = torch.rand(batch_rows, n_features, generator=generator) < 8 / n_features
        batches.append((torch.rand(batch_rows, n_features, generator=generator) * on) @ features)
    return batches


def matmul_flop_rate(batch_rows: int, d_model: int, n_latents: int, n_members: int,
                     device: torch.device, repeats: int = 10) -> float:
    """torch's own FLOP/s for these shapes: the better of one plain mm per member and one bmm."""
    x = torch.randn(batch_rows, d_model, device=device)
    weights = torch.randn(n_members, d_model, n_latents, device=device)
    stacked_x = x.expand(n_members, batch_rows, d_model).contiguous()

    def rate(run) -> float:
        run()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize(device)
        return 2 * batch_rows * d_model * n_latents * n_members * repeats / (time.perf_counter() - start)

    return max(rate(lambda: [x @ weights[i] for i in range(n_members)]),
               rate(lambda: torch.bmm(stacked_x, weights)))


def bench_train(d_model: int, n_latents: int, batch_rows: int, n_members: int, steps: int,
                architecture: str = "relu", kernels: tuple[str, ...] | None = None,
                reference: bool = True, device: str = "cpu", warmup: int = 2) -> dict:
    """Measure one ensemble shape; returns the JSON-ready result."""
    device = torch.device(device)
    members = bench_members(architecture, n_members, n_latents)
    batches = sparse_batches(d_model, batch_rows, steps + warmup)
    config = TrainConfig(tokens=batch_rows * (steps + warmup), batch_rows=batch_rows, lr_warmup_steps=1)
    total_steps = steps + warmup
    samples = n_members * batch_rows  # SAE-samples per step

    per_kernel, ensembles = {}, {}
    for kernel in kernels or default_candidates(device):
        ensemble = build_ensemble(architecture, d_model, n_latents, members, kernel=kernel)
        per_kernel[kernel] = samples / time_steps(EnsembleTrainer(ensemble, config, total_steps, device),
                                                  batches, warmup)
        ensembles[kernel] = ensemble
    best = max(per_kernel, key=per_kernel.get)

    result = {
        "architecture": architecture, "d_model": d_model, "n_latents": n_latents,
        "batch_rows": batch_rows, "members": n_members, "steps": steps, "device": str(device),
        "kernel": best, "sae_samples_per_s": per_kernel[best],
        "kernels": {name: round(value, 1) for name, value in per_kernel.items()},
    }
    if reference:
        singles = [EnsembleTrainer(build_ensemble(architecture, d_model, n_latents, [member]), config,
                                   total_steps, device) for member in members]
        seconds = time_steps(DeviceTrainer(singles, device), batches, warmup)  # one SAE at a time
        result["reference_sae_samples_per_s"] = samples / seconds
        result["speedup_vs_reference"] = per_kernel[best] / result["reference_sae_samples_per_s"]
        result["max_abs_weight_diff_vs_reference"] = max(
            float((ensembles[best].W_dec[i] - single.ensemble.W_dec[0]).detach().abs().max())
            for i, single in enumerate(singles))

    # 5 matmuls of 2*B*d*n per member per step: encoder and decoder forward, decoder weight and
    # input gradients, encoder weight gradient (the b_dec gradient is a vector product).
    achieved = 10 * batch_rows * d_model * n_latents * n_members * per_kernel[best] / samples
    matmul_rate = matmul_flop_rate(batch_rows, d_model, n_latents, n_members, device)
    result.update({"achieved_gflops": achieved / 1e9, "matmul_gflops": matmul_rate / 1e9,
                   "fraction_of_matmul_rate": achieved / matmul_rate,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result

