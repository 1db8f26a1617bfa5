"""The training step on one device: every ensemble it holds steps on each batch.

A batch of the stream is one or more optimizer steps (`TrainConfig.rows_per_step`). Read
`EnsembleTrainer.optimizer_step` top to bottom: scale the batch (aim at the L0 targets when steering
starts), forward (bf16 autocast on GPUs), the losses, backward with per-member clipping folded into
Adam at the scheduled learning rate and the decoder constraints, the batch's statistics, firing
statistics, metric sums, L0 targets, dead-latent resampling. The ZeRO trainer (`zero.py`) runs the
same step and overrides its hooks: `losses`, `apply`, `reduce`, `replace_dead` and `init_decoder_bias`.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from dictsweep.config import TrainConfig
from dictsweep.sae.ensemble import Ensemble, EnsembleOutput
from dictsweep.sae.metrics import FiringTracker
from dictsweep.train.optim import StackedAdam, clip_divisor, grad_norm_per_member
from dictsweep.train.target_l0 import L0Controller

STEP_METRICS = ("loss", "mse", "fvu", "l0", "sparsity_loss", "aux_loss")
AUXK_WINDOW_MAX = 10_000_000  # Gao et al. 2024's dead threshold (tokens), for budgets of billions
AUXK_WINDOW_FRACTION = 1 / 16  # of the budget: a 1M-token run gets AuxK after 65k silent tokens, not never


def auxk_window(config: TrainConfig) -> int:
    """Tokens without firing after which AuxK counts a latent dead: `auxk_window_tokens`, or by default
    1/16 of the budget, at most Gao et al.'s 10M. (Recovery of synthetic features at 1M tokens,
    topk, 512 latents: k=10 0.70 -> 0.78 with AuxK after 65k silent tokens instead of never.)"""
    return config.auxk_window_tokens or max(1, min(AUXK_WINDOW_MAX, int(config.tokens * AUXK_WINDOW_FRACTION)))


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up over `lr_warmup_steps`, then linear decay to 0 over the last `lr_decay_fraction`."""
    factor = min(1.0, (step + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
    decay_start = total_steps * (1 - config.lr_decay_fraction)
    if config.lr_decay_fraction > 0 and step >= decay_start:
        factor *= max(0.0, (total_steps - step) / (total_steps - decay_start))
    return factor


def sparsity_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """The sparsity warm-up: linear from 0 to 1 over the first `l1_warmup_fraction` (it scales relu's
    and jumprelu's coefficient; the top-k family's k falls from `K_WARMUP_START` x k to k)."""
    warmup_steps = config.l1_warmup_fraction * total_steps
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps >= 1 else 1.0


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast: `precision`, where auto means on GPUs only."""
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


@functools.cache
def keep_freed_memory() -> None:
    """On glibc, serve large tensors from the heap and keep freed memory in the process, instead of
    mapping fresh pages for every `[K, B, n]` tensor a CPU step allocates: zeroing and faulting them
    in costs more than a pass over the tensor (10x on a VM). Process-wide; RSS stays at its peak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library: leave its allocator alone
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd allocations
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back


@dataclass
class MetricSums:
    """Running sums of per-member step metrics between two logging points."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    steps: int = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.steps += 1

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "steps": self.steps}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.sums = {name: total.to(device) for name, total in state["sums"].items()}
        self.steps = state["steps"]

    def mean_and_reset(self) -> dict[str, list[float]]:
        means = {name: (total / max(self.steps, 1)).tolist() for name, total in self.sums.items()}
        self.sums, self.steps = {}, 0
        return means


class BatchStatistics(NamedTuple):
    """What one step adds to the firing statistics and metric sums: of the whole batch (under ZeRO
    the global batch, of which each worker holds a slice)."""

    fire_counts: Tensor  # [K, n_latents]
    metrics: dict[str, Tensor]  # each of STEP_METRICS -> [K]
    rows: int


class DeadLatents:
    """When dead latents get AuxK or resampling, from the firing statistics and the schedule (the part
    of `EnsembleTrainer` that reads its `ensemble`, `config`, `firing`, `step_count`, `total_steps`).

    Whether anything is dead is a host-device synchronisation: on CPUs (where it is free) it is asked
    every step; on GPUs only at logging points (`check_dead`), and AuxK runs from the next step on."""

    check_dead_every_step: bool = True
    any_dead: bool = False  # on GPUs: something was dead at the last logging point

    def auxk_dead_mask(self) -> Tensor | None:
        """Latents dead for a window `[K, n]`, for architectures trained with AuxK; None when none is."""
        if self.ensemble.dead_latents != "auxk" or self.config.auxk_coef == 0:
            return None
        window = auxk_window(self.config)
        if self.firing.tokens_seen < window:
            return None  # no window has passed: nothing can be dead yet (and no device sync)
        if not self.check_dead_every_step:
            return self.firing.dead_mask(window) if self.any_dead else None
        dead = self.firing.dead_mask(window)
        return dead if bool(dead.any()) else None

    def check_dead(self) -> None:
        """At a logging point (a synchronisation anyway): note whether anything is dead, for AuxK."""
        window = auxk_window(self.config)
        if not self.check_dead_every_step and self.firing.tokens_seen >= window:
            self.any_dead = bool(self.firing.dead_mask(window).any())

    def resample_due(self, rows: int) -> Tensor | None:
        """The dead mask `[K, n]` when the batch of `rows` just counted crossed a resampling point in
        the resampling part of training and something is dead; else None."""
        every, tokens = self.config.resample_every_tokens, self.firing.tokens_seen
        if self.ensemble.dead_latents != "resample" or every == 0 or tokens // every == (tokens - rows) // every:
            return None
        if self.step_count > self.config.resample_until_fraction * self.total_steps:
            return None
        return self.firing.dead_mask()  # no `any()` here: resampling nothing changes nothing


class EnsembleTrainer(DeadLatents):
    """One ensemble on one device: its optimizer, schedules, firing statistics and dead latents.

    `optimizer_step` is every trainer's step; a trainer that spreads one SAE over devices (`zero.py`)
    overrides the hooks it calls (`losses`, `apply`, `reduce`, `replace_dead`, `init_decoder_bias`)."""

    def __init__(self, ensemble: Ensemble, config: TrainConfig, total_batches: int, device: torch.device | str = "cpu"):
        self.ensemble = ensemble.to(device)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.params = list(ensemble.parameters())
        self.optimizer = StackedAdam(self.params, ensemble.lr, (config.adam_beta1, config.adam_beta2), config.adam_eps)
        self.forward = torch.compile(ensemble.forward) if ensemble.kernel == "compile" else ensemble.forward
        self.check_dead_every_step = self.device.type != "cuda"
        self.rows_per_step = config.rows_per_step(ensemble.budget_steps)
        self.start(config, total_batches * (config.batch_rows // self.rows_per_step))

    def start(self, config: TrainConfig, total_steps: int) -> None:
        """The schedules and what the step keeps besides weights and optimizer state, for `self.ensemble`
        on `self.device`: firing statistics, metric sums, the step count, latents resampled, the
        members' resampling generators and the L0 controller."""
        ensemble, device = self.ensemble, self.device
        self.config, self.total_steps = config, total_steps
        self.firing = FiringTracker(
            ensemble.n_members, ensemble.n_latents, config.dead_window_tokens, config.dense_threshold, device
        )
        self.metrics = MetricSums()
        self.step_count = 0
        self.bf16 = uses_bf16(config, device)
        self.resampled = torch.zeros(ensemble.n_members, device=device)  # latents resampled so far, [K]
        # resampling draws rows from each member's own stream, so a member's draws ignore its neighbours
        self.generators = [torch.Generator().manual_seed(member.seed + 2**32) for member in ensemble.members]
        self.l0_controller = L0Controller.for_ensemble(ensemble, config, total_steps)  # None: no L0 targets

    def scale(self, batch: Tensor) -> Tensor:
        """Raw activations `[B, d_model]` to the training scale (E|x|^2 = d_model), float32 on device."""
        return batch.to(self.device, torch.float32, non_blocking=True) * self.ensemble.input_scale

    def step(self, batch: Tensor) -> None:
        """Every member trains on a raw batch of the stream `[B, d_model]`: consecutive optimizer steps
        of `rows_per_step` rows each."""
        for rows in batch.split(self.rows_per_step):
            self.optimizer_step(rows)

    def optimizer_step(self, batch: Tensor) -> None:
        """One optimizer step of every member on raw rows `[S, d_model]` (under ZeRO, this worker's
        slice of the step's rows)."""
        x = self.scale(batch)
        if self.step_count == 0 and self.ensemble.decoder_bias_from_data:
            self.init_decoder_bias(x)
        if self.l0_controller is not None and self.step_count == self.l0_controller.first_step:
            self.aim_at_l0(x)  # the controller then starts near the targets
        factor = sparsity_factor(self.step_count, self.total_steps, self.config)
        self.ensemble.warming_up = factor < 1.0  # the top-k family keeps more latents until then
        # a tensor, not a float, so a compiled forward is not specialised on every warm-up value
        # (a fill, not torch.tensor: copying a host scalar to a GPU waits for the stream)
        warmup = torch.full((), factor, device=self.device)
        dead_mask = self.auxk_dead_mask()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            out = self.forward(x, warmup, dead_mask, self.config.auxk_coef, self.config.auxk_k)
        losses = self.losses(x, out, dead_mask)
        self.apply(losses["loss"])
        batch_statistics = self.reduce(x, out.fire_counts.detach(), losses)
        self.firing.update(batch_statistics.fire_counts, batch_statistics.rows)
        self.metrics.add(batch_statistics.metrics)
        if self.l0_controller is not None:
            self.l0_controller.update(batch_statistics.metrics["l0"].detach(), self.step_count)
        self.step_count += 1
        self.resample_dead(x, out, batch_statistics.rows)

    # -- the step's hooks ---------------------------------------------------------------------------
    def losses(self, x: Tensor, out: EnsembleOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        """The step metrics `[K]` by name (`STEP_METRICS`); "loss" is what `apply` back-propagates."""
        return {name: getattr(out, name) for name in STEP_METRICS}

    def init_decoder_bias(self, x: Tensor) -> None:
        """Before the first step, b_dec from the (scaled) batch `x` (architectures that start it so)."""
        self.ensemble.init_decoder_bias(x)

    def apply(self, loss: Tensor) -> None:
        """Backward of `loss [K]`, then the optimizer step with the decoder constraints around it."""
        loss.sum().backward()
        self.ensemble.constrain_gradients()
        divisor = clip_divisor(grad_norm_per_member(self.params), self.config.grad_clip)
        self.optimizer.step(lr_factor(self.step_count, self.total_steps, self.config), divisor)
        self.optimizer.zero_grad()
        self.ensemble.constrain_weights()

    def reduce(self, x: Tensor, fire_counts: Tensor, losses: dict[str, Tensor]) -> BatchStatistics:
        """The batch's fire counts, step metrics and rows: on one device the batch is all there is."""
        return BatchStatistics(fire_counts, losses, len(x))

    def resample_dead(self, x: Tensor, out: EnsembleOutput, rows: int) -> None:
        """Every `resample_every_tokens` in the first `resample_until_fraction` of training, give
        latents dead for a window new weights and fresh Adam moments (architectures that resample);
        `rows`: the rows of the batch the firing statistics just counted."""
        dead = self.resample_due(rows)
        if dead is None:
            return
        changed = self.replace_dead(dead, x, out)
        self.firing.revive(changed["b_enc"])
        self.resampled += changed["b_enc"].sum(-1)

    def replace_dead(self, dead: Tensor, x: Tensor, out: EnsembleOutput) -> dict[str, Tensor]:
        """New weights and zeroed Adam moments for the `dead [K, n]` latents, drawn from the batch;
        returns what changed: parameter name -> mask."""
        changed = self.ensemble.resample(dead, x, out.sae_out.detach(), self.generators)
        for name, mask in changed.items():
            self.optimizer.reset(getattr(self.ensemble, name), mask)
        return changed

    def aim_at_l0(self, x: Tensor) -> None:
        """Set what the architecture can so each targeted member fires at about its L0 target on the
        scaled batch `x`, with fresh Adam moments for what changed."""
        for name, mask in self.ensemble.aim_at_l0(x).items():
            self.optimizer.reset(getattr(self.ensemble, name), mask)

    def log_metrics(self) -> dict[str, list[float]]:
        """Per-member means since the last call, with the current dead and dense fractions and the
        latents resampled so far: name -> [K] values."""
        self.check_dead()
        means = self.metrics.mean_and_reset()
        means["dead_fraction"] = self.firing.dead_fraction().tolist()
        means["dense_fraction"] = self.firing.dense_fraction().tolist()
        means["resampled_latents"] = self.resampled.tolist()
        if self.l0_controller is not None:  # the steered coefficients
            means["l1_coef"] = self.ensemble.l1_coef.tolist()
        return means

    def state_dict(self) -> dict:
        """Tensors and plain data only (checkpoints are safetensors + JSON)."""
        return {
            "ensemble": self.ensemble.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "firing": self.firing.state_dict(),
            "step_count": self.step_count,
            "resampled": self.resampled,
            "generators": [generator.get_state() for generator in self.generators],
            "any_dead": self.any_dead,
            **({"l0_controller": self.l0_controller.state_dict()} if self.l0_controller else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`, whose tensors may be on any device (checkpoints load on the CPU)."""
        self.ensemble.load_state_dict(state["ensemble"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.firing.load_state_dict(
            {
                key: value.to(self.device) if isinstance(value, Tensor) else value
                for key, value in state["firing"].items()
            }
        )
        self.step_count = state["step_count"]
        self.resampled = state.get("resampled", self.resampled).to(self.device)
        for generator, saved in zip(self.generators, state.get("generators", [])):
            generator.set_state(saved.cpu())
        self.any_dead = state.get("any_dead", False)
        if self.l0_controller is not None:
            self.l0_controller.load_state_dict(state["l0_controller"])


class DeviceTrainer:
    """Every ensemble placed on one device, stepped in turn on each shared batch."""

    def __init__(self, trainers: list[EnsembleTrainer], device: torch.device | str = "cpu"):
        self.trainers, self.device = trainers, torch.device(device)

    def step(self, batch: Tensor) -> None:
        batch = batch.to(self.device, non_blocking=True)  # one host-to-device copy for all ensembles
        for trainer in self.trainers:
            trainer.step(batch)
