"""Final metrics of every member on held-out rows, accumulated batch by batch.

FVU uses the total variance of the whole eval set (about its mean), not per batch; MSE is per
element in the dataset's own units; a latent that fires on no eval row counts as dead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictsweep.sae.ensemble import Ensemble


class Evaluator:
    """Sums over eval batches for one ensemble; `results()` gives per-member metrics."""

    def __init__(self, ensemble: Ensemble):
        self.ensemble = ensemble
        device = ensemble.W_enc.device
        self.rows = 0
        self.residual = torch.zeros(ensemble.n_members, dtype=torch.float64, device=device)  # [K]
        self.active = torch.zeros(ensemble.n_members, dtype=torch.float64, device=device)  # [K]
        self.fires = torch.zeros(ensemble.n_members, ensemble.n_latents, device=device)  # [K, n]
        self.x_sum = torch.zeros(ensemble.d_model, dtype=torch.float64, device=device)
        self.x_sq_sum = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """One scaled batch `[B, d_model]`."""
        out = self.ensemble(x)
        self.rows += x.shape[0]
        self.residual += (out.sae_out - x).pow(2).sum(dim=(1, 2)).double()
        self.active += out.fire_counts.sum(-1).double()
        self.fires += out.fire_counts
        self.x_sum += x.sum(0).double()
        self.x_sq_sum += x.pow(2).sum().double()

    def results(self) -> list[dict[str, float]]:
        """Per member: mse (raw units, per element), fvu, l0, dead_fraction on the eval rows."""
        scale = float(self.ensemble.input_scale)
        total_variance = self.x_sq_sum - self.x_sum.pow(2).sum() / self.rows
        mse = self.residual / (self.rows * self.ensemble.d_model * scale ** 2)
        fvu = self.residual / total_variance
        l0 = self.active / self.rows
        dead = (self.fires == 0).float().mean(-1)
        return [{"mse": float(mse[i]), "fvu": float(fvu[i]), "l0": float(l0[i]),
                 "dead_fraction": float(dead[i])} for i in range(self.ensemble.n_members)]
