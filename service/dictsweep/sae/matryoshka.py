"""`matryoshka_batchtopk`: BatchTopK whose nested prefixes of the dictionary each reconstruct the
input (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

The latents are selected once, over the whole dictionary, as `batchtopk` selects them; the prefix
of the first w latents, for each prefix width w of the member, decodes them alone (with b_dec), and
its squared error joins the loss: loss = sum over prefixes (the whole dictionary included) of the
squared error + AuxK, as the paper and SAELens (`MatryoshkaBatchTopKTrainingSAE`) add them. The
early latents then carry what most rows need (general features), later ones refine them, and a
specific feature does not absorb a general one. AuxK is SAELens' matryoshka AuxK: the dead latents
of each prefix's own group reconstruct the residual of that prefix.

Prefixes are a grid key, `matryoshka_prefixes`: fractions of n_latents, increasing, each a member's
own (the last, the whole dictionary, is implied). Inference and export are `batchtopk`'s: a SAELens
`jumprelu` with the global threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor

from dictsweep.architecture_keys import MATRYOSHKA_PREFIXES as DEFAULT_PREFIXES
from dictsweep.sae.batchtopk import THRESHOLD_RATE, BatchTopKEnsemble
from dictsweep.sae.ensemble import AUXK_COEF, EnsembleOutput, register
from dictsweep.sae.hyperparameters import K, HyperParameter
from dictsweep.sae.metrics import squared_error

# DEFAULT_PREFIXES: each prefix 4x the one before it, as the paper's 128 ... 32768 (of 32768): the last two


def prefix_fractions(value) -> tuple[float, ...]:
    """Prefix fractions from a grid value (a list), a member's tuple, or MLflow's text of either;
    unset (None, 0, "") is ()."""
    if value in (None, 0, "", "None", ()):
        return ()
    if isinstance(value, str):
        value = json.loads(value.replace("(", "[").replace(")", "]").replace(",]", "]"))
    if isinstance(value, (int, float)):
        value = [value]
    return tuple(float(fraction) for fraction in value)


def prefix_widths(fractions: tuple[float, ...], n_latents: int) -> list[int]:
    """The member's prefix widths in latents, the whole dictionary last."""
    return [round(fraction * n_latents) for fraction in fractions or DEFAULT_PREFIXES] + [n_latents]


@dataclass(frozen=True)
class Prefixes(HyperParameter):
    """The grid key of prefix fractions: a value is a list of fractions of n_latents."""

    def name_part(self, value) -> str:
        return self.name_format.format("_".join(f"{fraction:g}" for fraction in prefix_fractions(value)))

    def problem(self, value, n_latents: int) -> str | None:
        fractions = prefix_fractions(value)
        widths = prefix_widths(fractions, n_latents)
        if not fractions or any(not 0 < f < 1 for f in fractions) or widths[0] < 1:
            return (
                f"grid.{self.key}: {list(fractions)} must be fractions in (0, 1) of n_latents={n_latents}, "
                "each at least one latent"
            )
        if any(low >= high for low, high in zip(widths, widths[1:])):
            return f"grid.{self.key}: {list(fractions)} of n_latents={n_latents} gives widths {widths[:-1]}, which must increase"
        return None

    def parse(self, text) -> tuple[float, ...] | None:
        return prefix_fractions(text) or None


MATRYOSHKA_PREFIXES = Prefixes("matryoshka_prefixes", prefix_fractions, "m{}", typical=DEFAULT_PREFIXES[0])


@register("matryoshka_batchtopk")
class MatryoshkaBatchTopKEnsemble(BatchTopKEnsemble):
    hyperparameters = (K, MATRYOSHKA_PREFIXES)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        widths = [prefix_widths(getattr(m, "matryoshka_prefixes", ()), self.n_latents) for m in self.members]
        levels = max(len(w) for w in widths)
        latent = torch.arange(self.n_latents)
        # each latent's group: how many of its member's prefixes end at or before it, [K, n_latents]
        group = torch.stack([(latent.unsqueeze(1) >= torch.tensor(w[:-1])).sum(1) for w in widths])
        self.register_buffer("group", group, persistent=False)
        # which inner prefixes a member has ([K, levels - 1]; a member with fewer has no loss for the rest)
        inner = torch.tensor([[level < len(w) - 1 for level in range(levels - 1)] for w in widths])
        self.register_buffer("inner_prefix", inner.float().view(self.n_members, levels - 1), persistent=False)
        self.levels = levels

    def forward(
        self,
        x: Tensor,
        sparsity_scale: Tensor | float = 1.0,
        dead_mask: Tensor | None = None,
        auxk_coef: float = AUXK_COEF,
        auxk_k: int = 0,
    ) -> EnsembleOutput:
        if not (self.training and torch.is_grad_enabled()):  # evaluation: the whole dictionary, as exported
            return super().forward(x, sparsity_scale, dead_mask, auxk_coef, auxk_k)
        smallest = []  # the smallest kept value [K], from the selection
        auxk = dead_mask is not None and auxk_coef != 0
        dead_groups = [dead_mask & (self.group == level) for level in range(self.levels)] if auxk else []

        def selection(pre: Tensor) -> list[tuple[Tensor, Tensor]]:
            values, indices, least = self.batch_topk(pre, sparsity_scale)
            smallest.append(least)
            return [(values, indices), *(self.auxk_select(pre, dead, auxk_k) for dead in dead_groups)]

        (latent_acts, latent_indices), *dead = self.select_latents(x, selection)  # [K, B, w]
        with torch.no_grad():
            estimate = self.threshold.lerp(smallest[0].float(), THRESHOLD_RATE)
            self.threshold.copy_(torch.where(self.threshold > 0, estimate, smallest[0].float()))
        group = self.group.gather(1, latent_indices.flatten(1)).view_as(latent_indices)  # [K, B, w]
        prefix_outs = [self.decode(latent_acts * (group <= level), latent_indices) for level in range(self.levels)]
        sae_out = prefix_outs[-1]  # the whole dictionary: every group
        target = self.target_of(x)  # x itself, for all but transcoders
        inner_losses = [
            squared_error(target, out) * self.inner_prefix[:, level] for level, out in enumerate(prefix_outs[:-1])
        ]
        no_penalty = torch.zeros(self.n_members, device=x.device)
        out = self.output(
            x,
            sae_out,
            latent_acts,
            latent_indices,
            self.fire_counts(latent_acts, latent_indices),
            no_penalty,
            self.matryoshka_auxk_loss(x, dead, prefix_outs, dead_groups, auxk_coef) if auxk else None,
        )
        return out._replace(loss=out.loss + sum(inner_losses, torch.zeros_like(out.loss)))

    def matryoshka_auxk_loss(
        self,
        x: Tensor,
        dead: list[tuple[Tensor, Tensor]],
        prefix_outs: list[Tensor],
        dead_groups: list[Tensor],
        coef: float,
    ) -> Tensor:
        """AuxK per group `[K]` (SAELens' `use_matryoshka_aux_loss`): the top dead latents of group g
        (`dead[g]`, of `dead_groups[g]`) reconstruct the residual x - (prefix g's reconstruction), each
        group scored by `auxk_from`; summed over groups."""
        losses = [self.auxk_from(x, *args, coef) for args in zip(prefix_outs, dead, dead_groups)]
        return sum(losses, torch.zeros(self.n_members, device=x.device))
