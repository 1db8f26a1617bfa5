"""`relu`: ReLU latents with an L1 penalty weighted by decoder row norms (Anthropic, April 2024).

The decoder is left free; penalising |f_i| * |W_dec_i| stops the model from shrinking latents and
growing decoder rows to dodge the penalty. Decoder rows start at norm 0.1, encoder = their transpose.
Dead latents are resampled (Anthropic, 2023): see `resample`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dictsweep.sae.ensemble import AUXK_COEF, Ensemble, EnsembleOutput, register

RESAMPLE_ENCODER_NORM = 0.2  # resampled encoder rows: this times the mean alive encoder norm


@register("relu")
class ReluEnsemble(Ensemble):
    saelens_architecture = "standard"
    decoder_init_norm = 0.1
    dead_latents = "resample"
    budget_steps = 16_384  # many small steps: rare features are learned from more updates (train.step_rows)

    def activate(self, pre: Tensor) -> tuple[Tensor, None]:
        return torch.relu(pre), None

    def forward(
        self,
        x: Tensor,
        sparsity_scale: Tensor | float = 1.0,
        dead_mask: Tensor | None = None,
        auxk_coef: float = AUXK_COEF,
        auxk_k: int = 0,
    ) -> EnsembleOutput:
        latent_acts = self.pre_acts(x).relu_()  # [K, B, n_latents]; in place: the matmul keeps no output
        sae_out = self.decode(latent_acts)
        # sum over rows first: the backward then broadcasts the norms instead of an outer product
        row_sums = latent_acts.sum(1, dtype=torch.float32)  # [K, n_latents]
        penalty = (row_sums * self.W_dec.norm(dim=-1)).sum(-1) / x.shape[0]  # [K]
        return self.output(
            x, sae_out, latent_acts, None, self.fire_counts(latent_acts, None), self.l1_coef * sparsity_scale * penalty
        )

    @torch.no_grad()
    def resample(
        self, dead: Tensor, x: Tensor, sae_out: Tensor, generators: list[torch.Generator]
    ) -> dict[str, Tensor]:
        """Re-initialise dead latents from badly reconstructed rows (Anthropic, 2023).

        Per member, rows of the batch `x [B, d_model]` are drawn with probability proportional to
        the square of their squared error, from the member's own generator; a dead latent's decoder
        row becomes the row's direction (a transcoder's: its target's) at the mean alive decoder norm (the 2023 recipe's unit norm,
        in our free-norm parameterisation), its encoder row that direction at 0.2 x the mean alive
        encoder norm, its encoder bias 0. Returns, per parameter name, the mask of changed entries
        (their optimizer state must be reset).
        """
        dead = dead & (dead.sum(-1, keepdim=True) < self.n_latents)  # [K, n]; all dead: nothing to copy
        inputs, targets = self.encoder_input(x), self.target_of(x)  # both x, but for transcoders
        losses = (sae_out.float() - targets).pow(2).sum(-1)  # [K, B]
        for member in range(self.n_members):
            latents = dead[member].nonzero().squeeze(1)  # [n_dead]
            if len(latents) == 0:
                continue
            weights = (losses[member].pow(2) + 1e-12).cpu()
            rows = torch.multinomial(weights, len(latents), replacement=True, generator=generators[member])
            rows = rows.to(x.device)
            alive = ~dead[member]
            decoder_norm = self.W_dec[member, alive].norm(dim=-1).mean()
            encoder_norm = self.W_enc[member][:, alive].norm(dim=0).mean()
            self.W_dec[member, latents] = nn.functional.normalize(targets[rows], dim=-1) * decoder_norm
            directions = nn.functional.normalize(inputs[rows], dim=-1)  # [n_dead, d_in]
            self.W_enc[member][:, latents] = directions.t() * RESAMPLE_ENCODER_NORM * encoder_norm
            self.b_enc[member, latents] = 0.0
        return {"W_enc": dead.unsqueeze(1), "b_enc": dead, "W_dec": dead.unsqueeze(-1)}
