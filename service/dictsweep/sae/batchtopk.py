"""`batchtopk`: keep the k x B largest pre-activations of the whole batch (Bussmann et al. 2024).

Rows get as many latents as they need, k on average. Training (a module in training mode, with
gradients on) estimates one global threshold per member: a moving average of the smallest
activation kept in each batch. Inference and evaluation (no gradients) keep what is above it, so
the exported dictionary is a SAELens `jumprelu` with that threshold on every latent.
Decoder at unit norm and AuxK for dead latents, as `topk`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictsweep.sae.ensemble import AUXK_COEF, EnsembleOutput, register
from dictsweep.sae.hyperparameters import K
from dictsweep.sae.topk import TopKEnsemble

THRESHOLD_RATE = 0.01  # moving-average rate of the threshold (SAELens' topk_threshold_lr)


@register("batchtopk")
class BatchTopKEnsemble(TopKEnsemble):
    saelens_architecture = "jumprelu"
    hyperparameters = (K,)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("threshold", torch.zeros(self.n_members))  # [K]; 0 until trained

    def activate(self, pre: Tensor) -> tuple[Tensor, None]:
        """Inference: dense latents above each member's global threshold."""
        return pre.relu() * (pre > self.threshold.view(-1, 1, 1)), None

    def batch_topk(self, pre: Tensor, sparsity_scale: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """Training: values and indices `[K, B, w]` of the k x B largest of each member's batch (k now,
        in the sparsity warm-up; w: the widest row; shorter rows padded with zeros), and the smallest
        kept value `[K]`."""
        n_members, rows, _ = pre.shape
        top = pre.detach().flatten(1).topk(self.widest_k() * rows, dim=-1, sorted=True).values  # [K, w_max * B]
        smallest = top.gather(1, self.k_now(sparsity_scale).view(-1, 1) * rows - 1).clamp_min(0)  # [K, 1]
        kept = pre.detach() >= smallest.unsqueeze(-1)  # [K, B, n_latents]
        width = max(int(kept.sum(-1).max()), 1)
        values, indices = pre.topk(width, dim=-1, sorted=False)  # [K, B, width]
        values = values.relu() * (values >= smallest.unsqueeze(-1))
        return values, indices, smallest.squeeze(1)

    def forward(
        self,
        x: Tensor,
        sparsity_scale: Tensor | float = 1.0,
        dead_mask: Tensor | None = None,
        auxk_coef: float = AUXK_COEF,
        auxk_k: int = 0,
    ) -> EnsembleOutput:
        pre = self.pre_acts(x)  # [K, B, n_latents]
        if not (self.training and torch.is_grad_enabled()):  # evaluation: as the exported dictionary
            latent_acts, latent_indices = self.activate(pre)
        else:
            latent_acts, latent_indices, smallest = self.batch_topk(pre, sparsity_scale)
            with torch.no_grad():
                estimate = self.threshold.lerp(smallest.float(), THRESHOLD_RATE)
                self.threshold.copy_(torch.where(self.threshold > 0, estimate, smallest.float()))
        sae_out = self.decode(latent_acts, latent_indices)
        no_penalty = torch.zeros(self.n_members, device=x.device)
        return self.output(
            x,
            sae_out,
            latent_acts,
            latent_indices,
            self.fire_counts(latent_acts, latent_indices),
            no_penalty,
            self.auxk_loss(x, pre, sae_out, dead_mask, auxk_coef, auxk_k),
        )

    def member_config(self, index: int) -> dict:
        return {}

    @torch.no_grad()
    def member_state(self, index: int) -> dict[str, Tensor]:
        state = super().member_state(index)
        state["threshold"] = torch.full((self.n_latents,), float(self.threshold[index] / self.input_scale))
        return state
