"""Choosing the ensemble's matmul kernel by measurement on the device it will run on.

Which is fastest (one batched matmul, one matmul per member, or a torch.compile'd forward) depends
on the device and the sizes: small SAEs leave a GPU idle between kernel launches and favour the
stacked or compiled forms; on a few CPU cores per-member matmuls can win at some sizes. Compiling
costs tens of seconds before the first step, so it is only tried when the planned steps could
repay a typical gain, and only chosen when they repay the build time actually measured.
"""

from __future__ import annotations

import statistics
import time

import torch

from dictsweep.config import TrainConfig
from dictsweep.sae.ensemble import Member, build_ensemble

KERNELS = ("bmm", "loop", "compile")
EAGER_KERNELS = ("bmm", "loop")
COMPILE_GAIN_GUESS = 0.3  # fraction of an eager step compiling typically saves (before measuring)
COMPILE_SECONDS_GUESS = 30.0  # typical build time of the compiled forward and backward


def default_candidates(device: torch.device | str, total_steps: int | None = None,
                       eager_step_seconds: float | None = None) -> tuple[str, ...]:
    """Kernels worth trying. Compile: when `total_steps` eager steps of `eager_step_seconds` would
    save more than its typical build time at a typical gain; with no plan, on GPUs only."""
    if total_steps is None or eager_step_seconds is None:
        return KERNELS if torch.device(device).type == "cuda" else EAGER_KERNELS
    pays = total_steps * eager_step_seconds * COMPILE_GAIN_GUESS > COMPILE_SECONDS_GUESS
    return KERNELS if pays else EAGER_KERNELS


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


def median_seconds(trainers: dict, batches: list[torch.Tensor], rounds: int = 3) -> dict[str, float]:
    """Median seconds per step of each trainer, timed in turn in every round on the same batches
    (after one warm-up step each), so a busy machine slows all of them alike."""
    for trainer in trainers.values():
        time_steps(trainer, batches[:1], warmup=1)
    seconds = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            seconds[name].append(time_steps(trainer, batches, warmup=0))
    return {name: statistics.median(values) for name, values in seconds.items()}


def choose_kernel(architecture: str, d_model: int, n_latents: int, members: list[Member],
                  batch_rows: int, device: torch.device | str = "cpu",
                  candidates: tuple[str, ...] | None = None, steps: int = 4,
                  total_steps: int | None = None) -> tuple[str, dict[str, float]]:
    """The fastest kernel for this ensemble shape on `device` over `total_steps` planned steps (None:
    unknown), and what was measured: seconds per step of each kernel tried (and `compile_seconds`)."""
    from dictsweep.train.loop import EnsembleTrainer

    if candidates is not None and len(candidates) == 1:
        return candidates[0], {}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch_rows, d_model, generator=generator) for _ in range(steps)]
    config = TrainConfig(tokens=batch_rows * 1000, batch_rows=batch_rows)

    def trainer(kernel: str) -> EnsembleTrainer:
        return EnsembleTrainer(build_ensemble(architecture, d_model, n_latents, members, kernel=kernel),
                               config, 1000, device)

    eager = [kernel for kernel in (candidates or EAGER_KERNELS) if kernel != "compile"]
    timings = median_seconds({kernel: trainer(kernel) for kernel in eager}, batches) if eager else {}
    best = min(timings, key=timings.get) if timings else None
    if "compile" not in (candidates or default_candidates(device, total_steps, timings.get(best))):
        return best, timings
    compiled = trainer("compile")
    start = time.perf_counter()
    compiled.step(batches[0])  # builds the compiled forward and backward
    synchronize(device)
    timings["compile_seconds"] = time.perf_counter() - start
    rivals = {"compile": compiled} | ({best: trainer(best)} if best else {})
    timings.update(median_seconds(rivals, batches))
    saving = timings[best] - timings["compile"] if best else float("inf")  # per step
    repaid = total_steps is None or saving * total_steps > timings["compile_seconds"]
    return ("compile" if saving > 0 and repaid else best), timings
