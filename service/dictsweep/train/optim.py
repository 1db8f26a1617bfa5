"""Adam over stacked `[K, ...]` parameters with a learning rate per member, and per-member clipping.

Each member's slices of every parameter go through torch's fused Adam kernel (one pass reading
parameter, gradient and both moments, on CPU and GPU), with that member's lr (a tensor: no
host-device sync) and its clipping divisor as the kernel's gradient scale: exactly what a lone
Adam with clipping would do.
State is plain tensors we own, so entries of a member can be reset (dead-latent resampling).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class StackedAdam:
    """Adam for parameters whose first dimension is the ensemble member."""

    def __init__(self, params: list[nn.Parameter], lr: Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr = list(params), lr  # lr: [K], read at every step (a member can be stopped with lr 0)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # each member's slices of parameters and moments, made once (all are updated in place)
        self.slices = [
            ([p.detach()[i] for p in self.params], [a[i] for a in self.exp_avg], [a[i] for a in self.exp_avg_sq])
            for i in range(len(lr))
        ]
        device = self.params[0].device
        self.step_tensor = torch.zeros((), device=device)  # the kernel reads the step count from a tensor
        self.found_inf = torch.zeros((), device=device)

    @torch.no_grad()
    def step(self, lr_factor: float = 1.0, grad_divisor: Tensor | None = None) -> None:
        """One update of every parameter from its `.grad`: lr = lr[K] * lr_factor, gradients of
        member i divided by `grad_divisor[i]` (`[K]`, e.g. for clipping) when given."""
        self.steps += 1
        self.step_tensor.fill_(self.steps)
        grads = [param.grad for param in self.params]
        for member, (params, exp_avg, exp_avg_sq) in enumerate(self.slices):
            torch._fused_adam_(
                params,
                [g[member] for g in grads],
                exp_avg,
                exp_avg_sq,
                [],
                [self.step_tensor] * len(self.params),
                lr=self.lr[member] * lr_factor,
                beta1=self.beta1,
                beta2=self.beta2,
                weight_decay=0.0,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
                grad_scale=None if grad_divisor is None else grad_divisor[member],
                found_inf=None if grad_divisor is None else self.found_inf,
            )

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def reset(self, param: nn.Parameter, mask: Tensor) -> None:
        """Zero both moments of `param` where `mask` (broadcastable to it) is True."""
        index = next(i for i, p in enumerate(self.params) if p is param)
        self.exp_avg[index].masked_fill_(mask, 0.0)
        self.exp_avg_sq[index].masked_fill_(mask, 0.0)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)


@torch.no_grad()
def grad_norm_per_member(params: list[nn.Parameter]) -> Tensor:
    """The joint gradient norm of each member over all parameters, `[K]` (one read of each gradient)."""
    norms = [torch.linalg.vector_norm(p.grad.reshape(len(p), -1), dim=1) for p in params]  # each [K]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


def clip_divisor(norms: Tensor, max_norm: float) -> Tensor | None:
    """What to divide each member's gradients by so their norm is at most `max_norm`; None for no clipping."""
    return (norms + 1e-6).div(max_norm).clamp(min=1.0) if max_norm > 0 else None
