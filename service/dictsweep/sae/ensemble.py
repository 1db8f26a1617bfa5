"""A stacked ensemble: K sparse autoencoders of one architecture and width trained as one module.

Weights are `[K, ...]` tensors and per-member hyper-parameters are `[K]` tensors, so one forward,
one backward and one optimizer step serve the whole stack. Member i is initialised from its own
seed alone and every reduction is per member, so a member trains exactly as it would alone.

The ensemble works on inputs already scaled so that E[|x|^2] = d_model (`input_scale` holds that
factor); `member_state` folds it back so exported weights take raw activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Member:
    """One SAE of an ensemble: its sparsity setting, learning rate and seed."""

    lr: float
    seed: int
    l1_coef: float = 0.0
    k: int = 0


class EnsembleOutput(NamedTuple):
    """What one forward pass of an ensemble gives. Per-member values are `[K]` tensors."""

    sae_out: Tensor
    """Reconstruction of the (scaled) input, `[K, B, d_model]`."""
    latent_acts: Tensor
    """Latent activations: dense `[K, B, n_latents]`, or `[K, B, k]` values when `latent_indices` is set."""
    latent_indices: Tensor | None
    """For sparse outputs, the latent index of each value in `latent_acts`, `[K, B, k]`."""
    fire_counts: Tensor
    """How many rows of the batch each latent fired on, `[K, n_latents]`."""
    mse: Tensor
    """Squared error summed over d_model, averaged over rows (scaled units), `[K]`."""
    fvu: Tensor
    """Fraction of variance unexplained on this batch, `[K]`."""
    l0: Tensor
    """Mean number of active latents per row, `[K]`."""
    sparsity_loss: Tensor
    """The sparsity penalty as added to the loss (coefficient and warm-up applied), `[K]`."""
    aux_loss: Tensor
    """Auxiliary loss (e.g. AuxK for dead latents), `[K]`; zeros where the architecture has none."""
    loss: Tensor
    """Total loss per member, `[K]`; the training step back-propagates `loss.sum()`."""


ARCHITECTURES: dict[str, type["Ensemble"]] = {}


def register(name: str):
    """Class decorator: makes an ensemble class available under its architecture name."""

    def add(cls: type[Ensemble]) -> type[Ensemble]:
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls

    return add


def build_ensemble(architecture: str, d_model: int, n_latents: int, members: list[Member],
                   **options) -> "Ensemble":
    """Make an ensemble of the named architecture (one of `ARCHITECTURES`)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](d_model, n_latents, members, **options)


class Ensemble(nn.Module):
    """Base of every architecture: parameters, encoder and decoder matmuls, losses and export."""

    architecture: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = "standard"
    decoder_init_norm: ClassVar[float] = 0.1
    unit_norm_decoder: ClassVar[bool] = False
    sparsity_key: ClassVar[str] = "l1_coef"  # the grid key that sets this architecture's sparsity

    def __init__(self, d_model: int, n_latents: int, members: list[Member], kernel: str = "bmm"):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.d_model, self.n_latents, self.members = d_model, n_latents, list(members)
        self.kernel = kernel
        inits = [self.init_member(member.seed) for member in members]
        self.W_enc = nn.Parameter(torch.stack([w_enc for w_enc, _ in inits]))  # [K, d_model, n_latents]
        self.W_dec = nn.Parameter(torch.stack([w_dec for _, w_dec in inits]))  # [K, n_latents, d_model]
        self.b_enc = nn.Parameter(torch.zeros(len(members), n_latents))  # [K, n_latents]
        self.b_dec = nn.Parameter(torch.zeros(len(members), d_model))  # [K, d_model]
        self.register_buffer("lr", torch.tensor([m.lr for m in members], dtype=torch.float32))
        self.register_buffer("l1_coef", torch.tensor([m.l1_coef for m in members], dtype=torch.float32))
        self.register_buffer("k", torch.tensor([m.k for m in members], dtype=torch.long))
        self.register_buffer("input_scale", torch.tensor(1.0))

    @property
    def n_members(self) -> int:
        return len(self.members)

    def init_member(self, seed: int) -> tuple[Tensor, Tensor]:
        """Encoder and decoder of one member from its seed alone: random decoder rows of a fixed
        norm, encoder = decoder transpose."""
        generator = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(self.n_latents, self.d_model, generator=generator)  # [n_latents, d_model]
        w_dec *= self.decoder_init_norm / w_dec.norm(dim=-1, keepdim=True)
        return w_dec.t().clone(), w_dec

    # -- the matmuls (kernel chosen per device and size by measurement) --------------------------
    def _matmul(self, bias: Tensor, inputs: Tensor, weight: Tensor) -> Tensor:
        """`bias + inputs @ weight` for each member: `[K, 1, m] + [K, B, j] @ [K, j, m]`."""
        if self.kernel == "loop":
            return torch.stack([torch.addmm(bias[i], inputs[i], weight[i]) for i in range(len(weight))])
        return torch.baddbmm(bias, inputs, weight)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations `[K, B, n_latents]` of a batch `[B, d_model]` (decoder bias removed first).

        (x - b_dec) @ W_enc is computed as x @ W_enc + (b_enc - b_dec @ W_enc): the batch is shared by
        every member and the gradient of b_dec costs a vector product instead of a batch matmul.
        """
        bias = self.b_enc.unsqueeze(1) - torch.bmm(self.b_dec.unsqueeze(1), self.W_enc)  # [K, 1, n_latents]
        return self._matmul(bias, x.expand(self.n_members, *x.shape), self.W_enc)

    def decode(self, latent_acts: Tensor, latent_indices: Tensor | None = None) -> Tensor:
        """Reconstruction `[K, B, d_model]` from dense latents (or values and indices)."""
        if latent_indices is not None:
            latent_acts = self.densify(latent_acts, latent_indices)
        return self._matmul(self.b_dec.unsqueeze(1), latent_acts, self.W_dec)

    def densify(self, values: Tensor, indices: Tensor) -> Tensor:
        """Dense `[K, B, n_latents]` latents from `[K, B, k]` values and indices."""
        dense = values.new_zeros(*values.shape[:-1], self.n_latents)
        return dense.scatter(-1, indices, values)

    # -- what each architecture defines ---------------------------------------------------------
    def activate(self, pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """Latents from pre-activations: dense `[K, B, n]`, or values and indices `[K, B, k]`."""
        raise NotImplementedError

    def sparsity_penalty(self, latent_acts: Tensor, latent_indices: Tensor | None) -> Tensor:
        """Sparsity penalty per member `[K]` before its coefficient (zeros where none)."""
        return latent_acts.new_zeros(self.n_members)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Latents of a scaled batch `[B, d_model]` for every member."""
        return self.activate(self.pre_acts(x))

    def forward(self, x: Tensor, sparsity_scale: Tensor | float = 1.0) -> EnsembleOutput:
        """Encode, decode and score a scaled batch `[B, d_model]` for every member."""
        latent_acts, latent_indices = self.encode(x)
        sae_out = self.decode(latent_acts, latent_indices)
        mse = (sae_out - x).pow(2).sum(-1).mean(-1)  # [K]
        total_variance = (x - x.mean(0)).pow(2).sum(-1).mean()
        penalty = self.sparsity_penalty(latent_acts, latent_indices)
        sparsity_loss = self.l1_coef * sparsity_scale * penalty
        aux_loss = torch.zeros_like(mse)
        fire_counts = self.fire_counts(latent_acts, latent_indices)
        return EnsembleOutput(
            sae_out=sae_out, latent_acts=latent_acts, latent_indices=latent_indices,
            fire_counts=fire_counts, mse=mse, fvu=mse / total_variance,
            l0=fire_counts.sum(-1) / x.shape[0], sparsity_loss=sparsity_loss, aux_loss=aux_loss,
            loss=mse + sparsity_loss + aux_loss)

    def fire_counts(self, latent_acts: Tensor, latent_indices: Tensor | None) -> Tensor:
        """Rows of the batch on which each latent fired, `[K, n_latents]`."""
        if latent_indices is None:  # latents are non-negative, so non-zero means fired
            return torch.count_nonzero(latent_acts.detach(), dim=1).float()
        fired = (latent_acts.detach() > 0).float()
        counts = latent_acts.new_zeros(self.n_members, self.n_latents)
        return counts.scatter_add(-1, latent_indices.flatten(1), fired.flatten(1))

    # -- constraints around the optimizer step --------------------------------------------------
    @torch.no_grad()
    def constrain_gradients(self) -> None:
        """Before the optimizer step: for unit-norm decoders, drop the gradient along each row."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            rows = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
            parallel = (self.W_dec.grad * rows).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * rows

    @torch.no_grad()
    def constrain_weights(self) -> None:
        """After the optimizer step: for unit-norm decoders, renormalise each decoder row."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    # -- export ---------------------------------------------------------------------------------
    def member_config(self, index: int) -> dict:
        """Architecture-specific SAELens config keys of one member (e.g. `k`)."""
        return {}

    @torch.no_grad()
    def member_state(self, index: int) -> dict[str, Tensor]:
        """One member's weights for raw (unscaled) inputs, in SAELens names and shapes.

        Training saw x * s. Latents are divided by s so the decoder keeps its norms:
        b_enc / s, b_dec / s (and thresholds / s); W_enc and W_dec are unchanged.
        """
        scale = float(self.input_scale)
        return {
            "W_enc": self.W_enc[index].float().clone(),
            "b_enc": (self.b_enc[index] / scale).float(),
            "W_dec": self.W_dec[index].float().clone(),
            "b_dec": (self.b_dec[index] / scale).float(),
        }
