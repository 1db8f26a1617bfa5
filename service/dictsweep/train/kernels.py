"""Choosing the ensemble's matmul kernel (and, on GPUs, its top-k decoder) by measurement on the
device it will run on, at the sweep's shapes.

Which is fastest (one batched matmul, one matmul per member, or a torch.compile'd forward) depends
on the device and the sizes: small SAEs leave a GPU idle between kernel launches and favour the
stacked or compiled forms; on a few CPU cores per-member matmuls can win at some sizes. Compiling
costs tens of seconds before the first step, so it is only tried when the planned steps could
repay a typical gain, and only chosen when they repay the build time actually measured.
On GPUs the top-k family's `decode: auto` is measured too (dense matmul against the Triton
gather); on CPUs it keeps its density rule. So is its encoder wherever the path is measured (the
fused top-k encoder, with one or two-stage selection, against autograd through the dense
pre-activations): the encoders take turns on each kernel and decoder's trainer, so measuring them
adds no copy of the weights. A candidate that raises (a kernel that cannot run there, out of
memory) is dropped with a one-line note; only when every candidate fails does the error reach the
sweep.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import NamedTuple

import torch

from dictsweep.config import TrainConfig
from dictsweep.sae.ensemble import Member, build_ensemble

log = logging.getLogger(__name__)

KERNELS = ("bmm", "loop", "compile")
EAGER_KERNELS = ("bmm", "loop")
COMPILE_GAIN_GUESS = 0.3  # fraction of an eager step compiling typically saves (before measuring)
COMPILE_SECONDS_GUESS = 30.0  # typical build time of the compiled forward and backward


def default_candidates(
    device: torch.device | str, total_steps: int | None = None, eager_step_seconds: float | None = None
) -> tuple[str, ...]:
    """Kernels worth trying. Compile: when `total_steps` eager steps of `eager_step_seconds` would
    save more than its typical build time at a typical gain; with no plan, on GPUs only."""
    if total_steps is None or eager_step_seconds is None:
        return KERNELS if torch.device(device).type == "cuda" else EAGER_KERNELS
    pays = total_steps * eager_step_seconds * COMPILE_GAIN_GUESS > COMPILE_SECONDS_GUESS
    return KERNELS if pays else EAGER_KERNELS


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def decode_candidates(architecture: str, device: torch.device | str, decode: str = "auto") -> tuple[str, ...]:
    """Decoders worth measuring: on GPUs, dense and sparse for the top-k family under `auto`;
    otherwise the one configured (on CPUs `auto` keeps its density rule)."""
    from dictsweep.sae.ensemble import ARCHITECTURES

    if decode != "auto" or torch.device(device).type != "cuda" or ARCHITECTURES[architecture].sparsity_key != "k":
        return (decode,)
    return ("dense", "sparse")


def encode_candidates(architecture: str, device: torch.device | str, encode: str = "auto") -> tuple[str, ...]:
    """Encoders worth measuring: for the top-k family under `auto`, the dense path and the fused
    encoder (on GPUs also with its two-stage selection, which is slower on CPUs, and with its CSR
    weight gradient instead of the Triton scatter, which CPUs always use); otherwise the one configured."""
    from dictsweep.sae.ensemble import ARCHITECTURES

    if encode != "auto" or ARCHITECTURES[architecture].sparsity_key != "k":
        return (encode,)
    if torch.device(device).type == "cuda":
        return ("dense", "sparse", "sparse-chunked", "sparse-csr")
    return ("dense", "sparse")


class Path(NamedTuple):
    """How an ensemble computes, as chosen by `choose_path`."""

    kernel: str
    """The matmul kernel: bmm, loop or compile."""
    decode: str
    """The top-k family's decoder: dense, sparse or auto."""
    encode: str
    """The top-k family's encoder backward: dense, sparse, sparse-chunked or auto."""
    timings: dict[str, float]
    """Seconds per step of each candidate measured (named as `choose_path` says) and `compile_seconds`."""


class WithEncoder:
    """A trainer stepped with its ensemble's encoder set to `encode`: encoders take turns on one
    trainer (the encoder is a choice of algorithm, not of weights)."""

    def __init__(self, trainer, encode: str):
        self.trainer, self.encode, self.device = trainer, encode, trainer.device

    def step(self, batch: torch.Tensor) -> None:
        self.trainer.ensemble.encoding = self.encode
        self.trainer.step(batch)


def drop_note(name: str, error: BaseException) -> None:
    """The one-line note of a candidate that could not run."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    log.warning(f"kernel choice: {name} dropped ({type(error).__name__}: {first})")


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
    trainers, failed = dict(trainers), None
    seconds = {name: [] for name in trainers}
    for round_index in range(rounds + 1):  # round 0: one warm-up step each
        for name, trainer in list(trainers.items()):
            try:
                if round_index == 0:
                    time_steps(trainer, batches[:1], warmup=1)
                else:
                    seconds[name].append(time_steps(trainer, batches, warmup=0))
            except Exception as error:  # noqa: BLE001 - a candidate that cannot run here is dropped
                drop_note(name, error)
                failed, seconds[name] = error, []
                del trainers[name]
    if failed is not None and not trainers:
        raise failed
    return {name: statistics.median(values) for name, values in seconds.items() if values}


def choose_path(
    architecture: str,
    d_model: int,
    n_latents: int,
    members: list[Member],
    batch_rows: int,
    device: torch.device | str = "cpu",
    candidates: tuple[str, ...] | None = None,
    steps: int = 4,
    total_steps: int | None = None,
    decode: str = "auto",
    encode: str = "auto",
    d_target: int = 0,
) -> Path:
    """The fastest kernel, decoder and encoder for this ensemble shape on `device` over `total_steps`
    planned steps (None: unknown), and what was measured: seconds per step of each candidate tried
    (named `kernel`, `kernel/decode` when decoders are measured, `kernel/decode/encode` when encoders
    are) and `compile_seconds`."""
    from dictsweep.train.loop import EnsembleTrainer

    decodes = decode_candidates(architecture, device, decode)
    encodes = encode_candidates(architecture, device, encode)
    if candidates is not None and len(candidates) == 1 and len(decodes) == 1 and len(encodes) == 1:
        return Path(candidates[0], decodes[0], encodes[0], {})
    generator = torch.Generator().manual_seed(0)
    # a transcoder's rows: input, then target
    batches = [torch.randn(batch_rows, d_model + d_target, generator=generator).to(device) for _ in range(steps)]
    options = {"d_out": d_target} if d_target else {}
    # the steady step: no sparsity warm-up, in which the top-k family keeps 4k latents a row
    config = TrainConfig(tokens=batch_rows * 1000, batch_rows=batch_rows, l1_warmup_fraction=0)
    paths: dict[str, tuple[str, str, str]] = {}  # candidate name -> (kernel, decode, encode)

    def name(kernel: str, decoder: str, encoder: str) -> str:
        parts = [
            kernel,
            *([decoder] if len(decodes) > 1 or len(encodes) > 1 else []),
            *([encoder] if len(encodes) > 1 else []),
        ]
        paths["/".join(parts)] = (kernel, decoder, encoder)
        return "/".join(parts)

    def trainers(pairs: list[tuple[str, str]], encoders: tuple[str, ...]) -> dict[str, WithEncoder]:
        made = {}
        for kernel, decoder in pairs:
            try:
                ensemble = build_ensemble(
                    architecture,
                    d_model,
                    n_latents,
                    members,
                    kernel=kernel,
                    decode=decoder,
                    encode=encoders[0],
                    **options,
                )
                trainer = EnsembleTrainer(ensemble, config, 1000, device)
            except Exception as error:  # noqa: BLE001 - e.g. out of memory: this candidate is dropped
                drop_note(name(kernel, decoder, encoders[0]), error)
                continue
            made |= {name(kernel, decoder, encoder): WithEncoder(trainer, encoder) for encoder in encoders}
        return made

    eager = [
        (kernel, decoder) for kernel in (candidates or EAGER_KERNELS) if kernel != "compile" for decoder in decodes
    ]
    timings = median_seconds(trainers(eager, encodes), batches) if eager else {}
    best = min(timings, key=timings.get) if timings else None
    if "compile" not in (candidates or default_candidates(device, total_steps, timings.get(best))):
        return Path(*paths[best], timings)
    _, best_decode, best_encode = paths[best] if best else ("", decodes[0], encodes[0])
    compile_name = name("compile", best_decode, best_encode)
    compiled = trainers([("compile", best_decode)], (best_encode,))
    try:
        start = time.perf_counter()
        compiled[compile_name].step(batches[0])  # builds the compiled forward and backward
        synchronize(device)
    except Exception as error:  # noqa: BLE001 - a compiler that fails here leaves the eager choice
        if best is None:
            raise
        drop_note(compile_name, error)
        return Path(*paths[best], timings)
    timings["compile_seconds"] = time.perf_counter() - start
    rivals = compiled | (trainers([paths[best][:2]], (best_encode,)) if best else {})
    timings.update(median_seconds(rivals, batches))
    if compile_name not in timings:
        return Path(*paths[best], timings)
    saving = timings[best] - timings[compile_name] if best else float("inf")  # per step
    repaid = total_steps is None or saving * total_steps > timings["compile_seconds"]
    return Path(*paths[compile_name if saving > 0 and repaid else best], timings)
