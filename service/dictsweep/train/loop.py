"""The training step on one device: every ensemble it holds steps on each batch.

Read top to bottom: scale the batch, forward, backward, per-member clipping, Adam with the
scheduled learning rate, decoder constraints, firing statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dictsweep.config import TrainConfig
from dictsweep.sae.ensemble import Ensemble
from dictsweep.sae.metrics import FiringTracker
from dictsweep.train.optim import StackedAdam, clip_grad_norm_per_member

STEP_METRICS = ("loss", "mse", "fvu", "l0", "sparsity_loss", "aux_loss")


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up over `lr_warmup_steps`, then linear decay to 0 over the last `lr_decay_fraction`."""
    factor = min(1.0, (step + 1) / config.lr_warmup_steps) if config.lr_warmup_steps else 1.0
    decay_start = total_steps * (1 - config.lr_decay_fraction)
    if config.lr_decay_fraction > 0 and step >= decay_start:
        factor *= max(0.0, (total_steps - step) / (total_steps - decay_start))
    return factor


def sparsity_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """The sparsity coefficient's warm-up: linear from 0 to 1 over the first `l1_warmup_fraction`."""
    warmup_steps = config.l1_warmup_fraction * total_steps
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps >= 1 else 1.0


@dataclass
class MetricSums:
    """Running sums of per-member step metrics between two logging points."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    steps: int = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.steps += 1

    def mean_and_reset(self) -> dict[str, list[float]]:
        means = {name: (total / max(self.steps, 1)).tolist() for name, total in self.sums.items()}
        self.sums, self.steps = {}, 0
        return means


class EnsembleTrainer:
    """One ensemble on one device: its optimizer, schedules and firing statistics."""

    def __init__(self, ensemble: Ensemble, config: TrainConfig, total_steps: int,
                 device: torch.device | str = "cpu"):
        self.ensemble = ensemble.to(device)
        self.config, self.total_steps, self.device = config, total_steps, torch.device(device)
        self.params = [ensemble.W_enc, ensemble.b_enc, ensemble.W_dec, ensemble.b_dec]
        self.optimizer = StackedAdam(self.params, ensemble.lr, (config.adam_beta1, config.adam_beta2),
                                     config.adam_eps)
        self.firing = FiringTracker(ensemble.n_members, ensemble.n_latents, config.dead_window_tokens,
                                    config.dense_threshold, device)
        self.metrics = MetricSums()
        self.step_count = 0
        self.forward = torch.compile(ensemble.forward) if ensemble.kernel == "compile" else ensemble.forward

    def scale(self, batch: Tensor) -> Tensor:
        """Raw activations `[B, d_model]` to the training scale (E|x|^2 = d_model), float32 on device."""
        return batch.to(self.device, torch.float32, non_blocking=True) * self.ensemble.input_scale

    def step(self, batch: Tensor) -> None:
        """One optimizer step of every member on a raw batch `[B, d_model]`."""
        x = self.scale(batch)
        # a tensor, not a float, so a compiled forward is not specialised on every warm-up value
        warmup = torch.tensor(sparsity_factor(self.step_count, self.total_steps, self.config), device=self.device)
        out = self.forward(x, warmup)
        out.loss.sum().backward()
        self.ensemble.constrain_gradients()
        clip_grad_norm_per_member(self.params, self.config.grad_clip)
        self.optimizer.step(lr_factor(self.step_count, self.total_steps, self.config))
        self.optimizer.zero_grad()
        self.ensemble.constrain_weights()
        self.firing.update(out.fire_counts.detach(), x.shape[0])
        self.metrics.add({name: getattr(out, name) for name in STEP_METRICS})
        self.step_count += 1

    def log_metrics(self) -> dict[str, list[float]]:
        """Per-member means since the last call, with the current dead fraction: name -> [K] values."""
        means = self.metrics.mean_and_reset()
        means["dead_fraction"] = self.firing.dead_fraction().tolist()
        means["dense_fraction"] = self.firing.dense_fraction().tolist()
        return means

    def state_dict(self) -> dict:
        return {"ensemble": self.ensemble.state_dict(), "optimizer": self.optimizer.state_dict(),
                "firing": self.firing.state_dict(), "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.ensemble.load_state_dict(state["ensemble"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.firing.load_state_dict(state["firing"])
        self.step_count = state["step_count"]


class DeviceTrainer:
    """Every ensemble placed on one device, stepped in turn on each shared batch."""

    def __init__(self, trainers: list[EnsembleTrainer], device: torch.device | str = "cpu"):
        self.trainers, self.device = trainers, torch.device(device)

    def step(self, batch: Tensor) -> None:
        batch = batch.to(self.device, non_blocking=True)  # one host-to-device copy for all ensembles
        for trainer in self.trainers:
            trainer.step(batch)
