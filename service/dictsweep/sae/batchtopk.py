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
        kept value `[K]`.

        One selection over the flattened batch: its positions (row x n_latents + latent), sorted, are
        grouped by row, and each lands in its row's next free slot. (A second top-k of every row to
        the widest row's width would pass over `[K, B, n_latents]` twice more.)"""
        n_members, rows, n_latents = pre.shape
        flat = pre.flatten(1)  # [K, B * n_latents]
        top, where = self.top_k(flat.detach(), self.widest_k() * rows)  # [K, L]
        kept = self.k_now(sparsity_scale).view(-1, 1) * rows  # [K, 1]
        smallest = top.gather(1, kept - 1).clamp_min(0)  # [K, 1]
        keep = (torch.arange(top.shape[1], device=pre.device) < kept) & (top > 0)  # [K, L]
        past_end = rows * n_latents  # what a dropped position becomes: sorts last, "row" `rows`
        where = torch.where(keep, where, past_end).sort(dim=-1).values  # [K, L], grouped by row
        row = where // n_latents  # [K, L]; `rows`: dropped
        counts = torch.zeros(n_members, rows + 1, dtype=torch.long, device=pre.device)
        counts.scatter_add_(1, row, torch.ones_like(row))  # [K, B + 1]
        width = max(int(counts[:, :rows].max()), 1)  # the widest row (a read of the device, as any batch top-k)
        first = counts.cumsum(1) - counts  # [K, B + 1]: each row's first position in `where`
        position = torch.arange(where.shape[1], device=pre.device) - first.gather(1, row)  # [K, L]
        slot = torch.where(row < rows, row * width + position, rows * width)  # dropped: one spare slot
        values = flat.gather(1, where.clamp_max(past_end - 1))  # [K, L], with gradients
        padded = values.new_zeros(n_members, rows * width + 1).scatter(1, slot, values)
        indices = torch.zeros(n_members, rows * width + 1, dtype=torch.long, device=pre.device)
        indices.scatter_(1, slot, where % n_latents)
        shape = (n_members, rows, width)
        return padded[:, :-1].view(shape), indices[:, :-1].view(shape), smallest.squeeze(1)

    def forward(
        self,
        x: Tensor,
        sparsity_scale: Tensor | float = 1.0,
        dead_mask: Tensor | None = None,
        auxk_coef: float = AUXK_COEF,
        auxk_k: int = 0,
    ) -> EnsembleOutput:
        training = self.training and torch.is_grad_enabled()
        smallest = []  # the smallest kept value [K], from the selection

        def select(pre: Tensor) -> tuple[Tensor, Tensor | None]:
            if not training:  # evaluation: as the exported dictionary
                return self.activate(pre)
            values, indices, least = self.batch_topk(pre, sparsity_scale)
            smallest.append(least)
            return values, indices

        (latent_acts, latent_indices), dead = self.encode_selected(x, select, dead_mask, auxk_coef, auxk_k)
        if training:
            with torch.no_grad():
                estimate = self.threshold.lerp(smallest[0].float(), THRESHOLD_RATE)
                self.threshold.copy_(torch.where(self.threshold > 0, estimate, smallest[0].float()))
        sae_out = self.decode(latent_acts, latent_indices)
        no_penalty = torch.zeros(self.n_members, device=x.device)
        return self.output(
            x,
            sae_out,
            latent_acts,
            latent_indices,
            self.fire_counts(latent_acts, latent_indices),
            no_penalty,
            self.auxk_from(x, sae_out, dead, dead_mask, auxk_coef),
        )

    def member_config(self, index: int) -> dict:
        return {}

    @torch.no_grad()
    def member_state(self, index: int) -> dict[str, Tensor]:
        state = super().member_state(index)
        state["threshold"] = torch.full((self.n_latents,), float(self.threshold[index] / self.input_scale))
        return state
