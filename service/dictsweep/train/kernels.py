"""Choosing the ensemble's matmul kernel by measurement on the device it will run on.

Which is fastest (one batched matmul, one matmul per member, or a torch.compile'd step) depends on
the device and the sizes: small SAEs leave a GPU idle between kernel launches and favour the
stacked or compiled forms; on a few CPU cores per-member matmuls can win at some sizes.
"""

from __future__ import annotations

import time

import torch

from dictsweep.config import TrainConfig
from dictsweep.sae.ensemble import Member, build_ensemble

KERNELS = ("bmm", "loop", "compile")


def default_candidates(device: torch.device | str) -> tuple[str, ...]:
    """Kernels worth trying: compiling pays off on GPUs; on CPU its build time rarely does."""
    return KERNELS if torch.device(device).type == "cuda" else ("bmm", "loop")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer, batches: list[torch.Tensor], warmup: int = 2) -> float:
    """Seconds per step of `trainer` over `batches`, after `warmup` untimed steps."""
    for batch in batches[:warmup]:
        trainer.step(batch)
    synchronize(trainer.device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        trainer.step(batch)
    synchronize(trainer.device)
    return (time.perf_counter() - start) / max(len(batches) - warmup, 1)


def choose_kernel(architecture: str, d_model: int, n_latents: int, members: list[Member],
                  batch_rows: int, device: torch.device | str = "cpu",
                  candidates: tuple[str, ...] | None = None, steps: int = 4) -> tuple[str, dict[str, float]]:
    """The fastest kernel for this ensemble shape on `device`, and seconds per step of each tried."""
    from dictsweep.train.loop import EnsembleTrainer

    candidates = candidates or default_candidates(device)
    if len(candidates) == 1:
        return candidates[0], {}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch_rows, d_model, generator=generator) for _ in range(steps + 2)]
    config = TrainConfig(tokens=batch_rows * 1000, batch_rows=batch_rows)
    timings = {}
    for kernel in candidates:
        ensemble = build_ensemble(architecture, d_model, n_latents, members, kernel=kernel)
        timings[kernel] = time_steps(EnsembleTrainer(ensemble, config, 1000, device), batches)
    return min(timings, key=timings.get), timings
