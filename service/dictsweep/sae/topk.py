"""`topk`: keep the k largest pre-activations of each row (Gao et al. 2024).

Sparsity is fixed by k, so there is no penalty; the decoder rows are kept at unit norm.
Members of one ensemble may have different k: the top max(k) are taken once, sorted, and each
member keeps its first k of them. Dead latents learn through the AuxK loss (`auxk_loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictsweep.sae.ensemble import AUXK_COEF, Ensemble, EnsembleOutput, register
from dictsweep.sae.hyperparameters import K
from dictsweep.sae.metrics import squared_error, variance


@register("topk")
class TopKEnsemble(Ensemble):
    saelens_architecture = "topk"
    hyperparameters = (K,)
    decoder_init_norm = 1.0
    unit_norm_decoder = True
    dead_latents = "auxk"
    # at 1M tokens (d_model 256, 512 features, 1024 latents, k=10) ground-truth recovery 0.941 -> 0.953
    decoder_bias_from_data = True

    def keep_first_k(self, values: Tensor) -> Tensor:
        """Zero, in sorted `[K, B, max(k)]` values, the entries past each member's own k."""
        k_values = [member.k for member in self.members]
        if min(k_values) == max(k_values):
            return values
        keep = torch.arange(values.shape[-1], device=values.device) < self.k.view(-1, 1, 1)  # [K, 1, max(k)]
        return values * keep

    def activate(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        k_max = max(member.k for member in self.members)
        values, indices = pre.topk(k_max, dim=-1, sorted=True)  # [K, B, k_max]
        return self.keep_first_k(torch.relu(values)), indices

    def forward(
        self,
        x: Tensor,
        sparsity_scale: Tensor | float = 1.0,
        dead_mask: Tensor | None = None,
        auxk_coef: float = AUXK_COEF,
        auxk_k: int = 0,
    ) -> EnsembleOutput:
        pre = self.pre_acts(x)  # [K, B, n_latents]
        latent_acts, latent_indices = self.activate(pre)  # [K, B, k_max]
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

    def auxk_loss(
        self, x: Tensor, pre: Tensor, sae_out: Tensor, dead_mask: Tensor | None, coef: float, k_aux: int
    ) -> Tensor | None:
        """AuxK (Gao et al. 2024), `[K]`: the top k_aux dead latents of each row (ReLU'd), decoded
        without bias, reconstruct the residual e = x - sae_out.

        Gao et al. divide the main and the auxiliary squared error by their targets' variances; our
        main loss is the plain squared error, so the auxiliary one is |e_hat - e|^2 * var(x) / var(e).
        Members with fewer than k_aux dead latents weigh it by dead / k_aux (as sparsify does).
        """
        if dead_mask is None or coef == 0:
            return None
        k_aux = min(k_aux or self.d_model // 2, self.n_latents)
        dead_pre = pre.masked_fill(~dead_mask.unsqueeze(1), float("-inf"))  # [K, B, n_latents]
        values, indices = dead_pre.topk(k_aux, dim=-1, sorted=False)  # [K, B, k_aux]; -inf: not dead, ReLU'd to 0
        residual = (x - sae_out.float()).detach()  # [K, B, d_model]
        error = squared_error(residual, self.decode(values.relu(), indices, bias=False))  # [K]
        normalised = error * variance(x) / variance(residual)  # [K]
        return coef * (dead_mask.sum(-1) / k_aux).clamp(max=1.0) * normalised

    def member_config(self, index: int) -> dict:
        return {"k": int(self.k[index]), "rescale_acts_by_decoder_norm": False}
