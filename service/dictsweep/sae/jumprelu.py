"""`jumprelu`: a latent passes its pre-activation when it exceeds a learned per-latent threshold
(Rajamanoharan et al. 2024), with an L0 penalty whose coefficient is the member's `l1_coef`; a
member with an L0 target T (`grid.target_l0`) is penalised by `l1_coef` * (L0 / T - 1)^2 instead.

The step has no useful gradient, so the threshold learns through straight-through estimators with
a rectangle kernel of width `BANDWIDTH`; the encoder gets the plain gradient of pre * H(pre - t).
Initial threshold, bandwidth and decoder norm are SAELens' defaults for inputs of norm ~sqrt(d_model)
(our training scale); a member with an L0 target has its thresholds set to fire at it when the
controller starts steering (`aim_at_l0`). The threshold is kept >= 0 after each step.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from dictsweep.sae.ensemble import AUXK_COEF, Ensemble, EnsembleOutput, register
from dictsweep.sae.hyperparameters import L1_COEF, TARGET_L0

BANDWIDTH = 0.05
L0_COEF = replace(L1_COEF, typical=0.1)  # `l1_coef` weighs an L0 penalty here: a tenth of relu's L1 trains alike
INITIAL_THRESHOLD = 0.01


class JumpReLU(torch.autograd.Function):
    """`(pre * (pre > t), fire_counts)` from `pre [K, B, n]` and `t [K, n]` (t >= 0); the counts' sum
    over latents is the L0. Straight-through gradients for t, with rect the band |pre - t| < eps / 2:
    d(pre * H)/dt = -(t / eps) * rect and d(H)/dt = -(1 / eps) * rect."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
        acts = pre * (pre > threshold.unsqueeze(1).to(pre.dtype))  # [K, B, n]
        ctx.save_for_backward(pre, acts, threshold)
        ctx.bandwidth = bandwidth
        return acts, acts.sign().sum(1, dtype=torch.float32)  # fired where acts > 0, as t >= 0

    @staticmethod
    def backward(ctx, grad_acts: Tensor, grad_counts: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, acts, threshold = ctx.saved_tensors
        grad_pre = torch.ops.aten.threshold_backward(grad_acts, acts, 0)  # passes where it fired
        near = (pre.float() - threshold.unsqueeze(1)).abs_() < ctx.bandwidth / 2  # [K, B, n]
        grad_near = threshold * (grad_acts * near).sum(1, dtype=torch.float32) + grad_counts * near.sum(1)
        return grad_pre, -grad_near / ctx.bandwidth, None


@register("jumprelu")
class JumpReLUEnsemble(Ensemble):
    hyperparameters = (L0_COEF, TARGET_L0)
    saelens_architecture = "jumprelu"
    decoder_init_norm = 0.1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold = nn.Parameter(torch.full((self.n_members, self.n_latents), INITIAL_THRESHOLD))  # [K, n]
        targets = [getattr(member, "target_l0", 0.0) for member in self.members]
        self.register_buffer("target_l0", torch.tensor(targets, dtype=torch.float32), persistent=False)  # [K]; 0: none

    def activate(self, pre: Tensor) -> tuple[Tensor, None]:
        return pre * (pre > self.threshold.unsqueeze(1)), None

    def forward(
        self,
        x: Tensor,
        sparsity_scale: Tensor | float = 1.0,
        dead_mask: Tensor | None = None,
        auxk_coef: float = AUXK_COEF,
        auxk_k: int = 0,
    ) -> EnsembleOutput:
        latent_acts, fire_counts = JumpReLU.apply(self.pre_acts(x), self.threshold, BANDWIDTH)  # [K, B, n], [K, n]
        sae_out = self.decode(latent_acts)
        l0 = fire_counts.sum(-1) / x.shape[0]  # [K], with straight-through gradients to the thresholds
        return self.output(
            x, sae_out, latent_acts, None, fire_counts.detach(), self.l1_coef * sparsity_scale * self.l0_penalty(l0)
        )

    def l0_penalty(self, l0: Tensor) -> Tensor:
        """`[K]`: the L0 itself, or for a member with a target T, (L0 / T - 1)^2: its gradient pulls
        the thresholds towards T from either side (a plain L0 penalty only ever raises them, and a
        threshold raised too far has no force but reconstruction to bring it back)."""
        targeted = self.target_l0 > 0
        return torch.where(targeted, (l0 / self.target_l0.clamp(min=1e-6) - 1).square(), l0)

    @torch.no_grad()
    def aim_at_l0(self, x: Tensor) -> dict[str, Tensor]:
        """Each latent of a member with target T gets the threshold that its pre-activations on the
        batch `x [B, d_model]` exceed on a fraction T / n_latents of rows: the member's L0 is then
        about T. Under Adam a threshold moves about one learning rate per step, too slow to bring an
        L0 of hundreds down to tens in a thousand steps."""
        pre = self.pre_acts(x)  # [K, B, n_latents]
        aimed = torch.zeros_like(self.threshold, dtype=torch.bool)  # [K, n_latents]
        for index, member in enumerate(self.members):
            target = getattr(member, "target_l0", 0.0)
            if target <= 0:
                continue
            rows_fired = min(len(x) - 1, round(target / self.n_latents * len(x)))
            self.threshold[index] = pre[index].topk(rows_fired + 1, dim=0).values[-1].clamp(min=0.0)
            aimed[index] = True
        return {"threshold": aimed}

    @torch.no_grad()
    def constrain_weights(self) -> None:
        self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def member_state(self, index: int) -> dict[str, Tensor]:
        state = super().member_state(index)
        state["threshold"] = (self.threshold[index] / self.input_scale).float()
        return state
