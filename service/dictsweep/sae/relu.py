"""`relu`: ReLU latents with an L1 penalty weighted by decoder row norms (Anthropic, April 2024).

The decoder is left free; penalising |f_i| * |W_dec_i| stops the model from shrinking latents and
growing decoder rows to dodge the penalty. Decoder rows start at norm 0.1, encoder = their transpose.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictsweep.sae.ensemble import Ensemble, register


@register("relu")
class ReluEnsemble(Ensemble):
    saelens_architecture = "standard"
    decoder_init_norm = 0.1

    def activate(self, pre: Tensor) -> tuple[Tensor, None]:
        return torch.relu(pre), None

    def sparsity_penalty(self, latent_acts: Tensor, latent_indices: Tensor | None) -> Tensor:
        # sum over rows first: the backward then broadcasts the norms instead of an outer product
        decoder_norms = self.W_dec.norm(dim=-1)  # [K, n_latents]
        return (latent_acts.sum(1) * decoder_norms).sum(-1) / latent_acts.shape[1]  # [K]
