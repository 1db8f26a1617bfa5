"""`topk`: keep the k largest pre-activations of each row (Gao et al. 2024).

Sparsity is fixed by k, so there is no penalty; the decoder rows are kept at unit norm.
Members of one ensemble may have different k: the top max(k) are taken once, sorted, and each
member keeps its first k of them. Dead latents learn through the AuxK loss (`auxk_from`).

The sparsity warm-up (`train.l1_warmup_fraction`) is k's: training starts at K_WARMUP_START x k
latents per row (at most d_model / 4) and falls linearly to k (as sparsify's k decay does, from
10 x d_model), so that latents find rare features before the competition for k slots sets in.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictsweep.sae.ensemble import AUXK_COEF, Ensemble, EnsembleOutput, register
from dictsweep.sae.hyperparameters import K
from dictsweep.sae.metrics import squared_error, variance
from dictsweep.sae.sparse_encode import Selection, chunked_topk, sparse_encode

# k at the start of the sparsity warm-up, as a multiple of k. d_model 128, 512 features (decay 0.99,
# 10 active), 2048 latents, k=10, 1M tokens, warm-up 0.2: mean max cosine 0.938 -> 0.991 (from
# min(n_latents, 10 x d_model), sparsify's start: 0.989, at 30x the decode work)
K_WARMUP_START = 4
# ... and at most this many latents per input dimension: with as many active latents as a quarter of
# the dimensions or more, rows are rebuilt without the features (d_model 32, 128 features, k=10:
# 0.959 without a warm-up, 0.716 from 40, 0.912 from 16; d_model 96, 384 features: 0.982 from 40,
# 0.966 from 24, 0.959 without)
K_WARMUP_MAX_PER_DIMENSION = 0.25


@register("topk")
class TopKEnsemble(Ensemble):
    saelens_architecture = "topk"
    hyperparameters = (K,)
    decoder_init_norm = 1.0
    unit_norm_decoder = True
    dead_latents = "auxk"
    # at 1M tokens (d_model 256, 512 features, 1024 latents, k=10) ground-truth recovery 0.941 -> 0.953
    decoder_bias_from_data = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cap = int(self.d_model * K_WARMUP_MAX_PER_DIMENSION)
        # where each member's warm-up starts: K_WARMUP_START x k, at most d_model / 4 (never below k: a k
        # that large has no warm-up), at most every latent; host ints for the width, a device copy for k_now
        self.k_starts = [min(max(m.k, min(m.k * K_WARMUP_START, cap)), self.n_latents) for m in self.members]
        self.register_buffer("k_start", torch.tensor(self.k_starts), persistent=False)  # [K]

    def k_now(self, sparsity_scale: Tensor | float) -> Tensor:
        """Each member's k `[K]` at sparsity warm-up factor `sparsity_scale` (0 -> 1): `k_start` falling
        linearly to k."""
        return (self.k_start - (self.k_start - self.k) * sparsity_scale).round().long()

    def widest_k(self) -> int:
        """The most latents a row of any member keeps now (host-side: `warming_up` is the trainer's flag)."""
        return max(self.k_starts) if self.warming_up else max(member.k for member in self.members)

    def keep_first_k(self, values: Tensor, sparsity_scale: Tensor | float = 1.0) -> Tensor:
        """Zero, in sorted `[K, B, w]` values, the entries past each member's own k (now)."""
        k_values = [member.k for member in self.members]
        if min(k_values) == max(k_values) and not self.warming_up:
            return values
        keep = torch.arange(values.shape[-1], device=values.device) < self.k_now(sparsity_scale).view(-1, 1, 1)
        return values * keep  # keep: [K, 1, w]

    def top_k(self, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k largest of the last dimension, sorted: one torch.topk, or two stages ("sparse-chunked")."""
        if self.encoding == "sparse-chunked":
            return chunked_topk(scores, k)
        return scores.topk(k, dim=-1, sorted=True)

    def sparse_encoding(self) -> bool:
        """Whether training steps run the fused encoder, whose backward touches only the selected
        latents (sparse_encode.py); auto: always (CPU measurements in docs/gpu.md; GPUs measure)."""
        return self.encoding != "dense"

    def encode_selected(
        self, x: Tensor, select, dead_mask: Tensor | None, auxk_coef: float, auxk_k: int
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """The latents `select(pre)` keeps of a scaled batch, and AuxK's top dead latents (None when
        AuxK is off), values and indices `[K, B, w]`."""
        auxk = dead_mask is not None and auxk_coef != 0
        selected = self.select_latents(
            x, lambda pre: [select(pre), *([self.auxk_select(pre, dead_mask, auxk_k)] if auxk else [])]
        )
        return selected[0], (selected[1] if auxk else None)

    def select_latents(self, x: Tensor, selection) -> Selection:
        """The (values, indices) pairs `selection(pre)` takes of the pre-activations of a scaled batch:
        through the fused encoder while training (its backward touches only what they hold), else
        autograd through the dense pre-activations."""
        if self.sparse_encoding() and self.training and torch.is_grad_enabled():
            csr = self.encoding == "sparse-csr"
            return sparse_encode(self.encoder_input(x), self.W_enc, self.encoder_bias(), self.matmul, selection, csr)
        return selection(self.pre_acts(x))

    def activate(self, pre: Tensor, sparsity_scale: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
        values, indices = self.top_k(pre, self.widest_k())  # [K, B, w]
        return self.keep_first_k(torch.relu(values), sparsity_scale), indices

    def forward(
        self,
        x: Tensor,
        sparsity_scale: Tensor | float = 1.0,
        dead_mask: Tensor | None = None,
        auxk_coef: float = AUXK_COEF,
        auxk_k: int = 0,
    ) -> EnsembleOutput:
        (latent_acts, latent_indices), dead = self.encode_selected(
            x, lambda pre: self.activate(pre, sparsity_scale), dead_mask, auxk_coef, auxk_k
        )  # [K, B, w]
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

    def auxk_select(self, pre: Tensor, dead_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
        """The top k_aux (0: d_model // 2) dead latents of each row, ReLU'd, values and indices `[K, B, k_aux]`."""
        k_aux = min(k_aux or self.d_model // 2, self.n_latents)
        dead_pre = pre.masked_fill(~dead_mask.unsqueeze(1), float("-inf"))  # [K, B, n_latents]
        if self.encoding == "sparse-chunked":
            values, indices = chunked_topk(dead_pre, k_aux)
        else:
            values, indices = dead_pre.topk(k_aux, dim=-1, sorted=False)  # -inf: not dead, ReLU'd to 0
        return values.relu(), indices

    def auxk_from(
        self, x: Tensor, sae_out: Tensor, dead: tuple[Tensor, Tensor] | None, dead_mask: Tensor | None, coef: float
    ) -> Tensor | None:
        """AuxK (Gao et al. 2024), `[K]`: the `dead` latents (`auxk_select`'s, None: no AuxK), decoded
        without bias, reconstruct the residual e = x - sae_out.

        Gao et al. divide the main and the auxiliary squared error by their targets' variances; our
        main loss is the plain squared error, so the auxiliary one is |e_hat - e|^2 * var(x) / var(e).
        Members with fewer than k_aux dead latents weigh it by dead / k_aux (as sparsify does).
        """
        if dead is None:
            return None
        values, indices = dead  # [K, B, k_aux]
        residual = (x - sae_out.float()).detach()  # [K, B, d_model]
        error = squared_error(residual, self.decode(values, indices, bias=False))  # [K]
        normalised = error * variance(x) / variance(residual).clamp_min(1e-12)  # [K]
        return coef * (dead_mask.sum(-1) / values.shape[-1]).clamp(max=1.0) * normalised

    def member_config(self, index: int) -> dict:
        return {"k": int(self.k[index]), "rescale_acts_by_decoder_norm": False}
