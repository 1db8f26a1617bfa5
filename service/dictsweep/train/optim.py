"""Adam over stacked `[K, ...]` parameters with a learning rate per member.

Element-wise, so each member's update is exactly what a lone Adam would do with its own lr.
State is plain tensors we own, so rows of a member can be reset (dead-latent resampling).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class StackedAdam:
    """Adam for parameters whose first dimension is the ensemble member."""

    def __init__(self, params: list[nn.Parameter], lr: Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr = list(params), lr  # lr: [K]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0) -> None:
        """One update of every parameter from its `.grad`, lr = lr[K] * lr_factor."""
        self.steps += 1
        correction1 = 1 - self.beta1 ** self.steps
        root_correction2 = math.sqrt(1 - self.beta2 ** self.steps)
        for param, avg, avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            grad = param.grad
            avg.lerp_(grad, 1 - self.beta1)
            avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            step_size = (self.lr * (lr_factor / correction1)).view(-1, *[1] * (param.dim() - 1))
            denom = (avg_sq.sqrt() / root_correction2).add_(self.eps)
            param.addcdiv_(avg * step_size, denom, value=-1.0)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def state_dict(self) -> dict:
        return {"steps": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)


@torch.no_grad()
def clip_grad_norm_per_member(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Scale each member's gradients so their joint norm is at most `max_norm`; returns norms `[K]`."""
    squares = sum(p.grad.pow(2).reshape(len(p), -1).sum(1) for p in params)  # [K]
    norms = squares.sqrt()
    if max_norm > 0:
        factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for param in params:
            param.grad.mul_(factors.view(-1, *[1] * (param.dim() - 1)))
    return norms
