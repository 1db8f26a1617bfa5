"""`topk`: keep the k largest pre-activations of each row (Gao et al. 2024).

Sparsity is fixed by k, so there is no penalty; the decoder rows are kept at unit norm.
Members of one ensemble may have different k: the top max(k) are taken once, sorted, and each
member keeps its first k of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictsweep.sae.ensemble import Ensemble, register


@register("topk")
class TopKEnsemble(Ensemble):
    saelens_architecture = "topk"
    decoder_init_norm = 1.0
    unit_norm_decoder = True
    sparsity_key = "k"

    def activate(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        k_max = int(self.k.max())
        values, indices = pre.topk(k_max, dim=-1, sorted=True)  # [K, B, k_max]
        values = torch.relu(values)
        if bool((self.k != k_max).any()):
            keep = torch.arange(k_max, device=pre.device) < self.k.view(-1, 1, 1)  # [K, 1, k_max]
            values = values * keep
        return values, indices

    def member_config(self, index: int) -> dict:
        return {"k": int(self.k[index]), "rescale_acts_by_decoder_norm": False}
