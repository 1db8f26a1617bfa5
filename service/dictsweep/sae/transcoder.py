"""Transcoders: a dictionary that reads one activation and reconstructs another (Dunefsky et al. 2024),
e.g. an MLP's input and its output; a skip transcoder adds a linear path, sae_out + x @ W_skip
(Paulo et al. 2025).

Every architecture whose SAELens export has a transcoder form gets two variants in the registry:
`<architecture>_transcoder` and `<architecture>_skip_transcoder` (the skip path changes the
parameters, so, as in SAELens, it is part of the architecture). The sparsity (ReLU + L1, JumpReLU,
BatchTopK, Matryoshka) is the base architecture's, unchanged; what changes:

- a batch is `[B, d_in + d_out]`: each row's input, then its target (a transcoder dataset's `act`
  and `target` columns, side by side). The trainer scales the whole row by `input_scale`; the
  target is scaled on to its own training scale (E|y|^2 = d_out) by `target_scale / input_scale`.
- the encoder reads the input without subtracting b_dec (b_dec is the output's bias):
  pre = x @ W_enc + b_enc; W_dec `[n_latents, d_out]`, b_dec `[d_out]`, W_skip `[d_in, d_out]`
  (zeros at the start, as in SAELens);
- every loss and metric (MSE, FVU, AuxK's residual, b_dec's start, resampling's errors) is
  against the target.

Exported as SAELens' `transcoder`, `skip_transcoder`, `jumprelu_transcoder` or
`jumprelu_skip_transcoder` (cfg `d_out`, `apply_b_dec_to_input` false; SAELens' W_skip is
`[d_out, d_in]`). topk has no SAELens transcoder form (use batchtopk).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dictsweep.sae.ensemble import ARCHITECTURES, Ensemble, Member, register

SAELENS_TRANSCODERS = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}  # SAE export -> transcoder's
BASES = ("relu", "jumprelu", "batchtopk", "matryoshka_batchtopk")


class Transcoder(Ensemble):
    """What a transcoder variant puts before its base architecture in the method order."""

    skip: bool = False
    transcoder: bool = True

    def __init__(self, d_model: int, n_latents: int, members: list[Member], d_out: int = 0, **options):
        if not (isinstance(d_out, int) and d_out > 0):  # no default: a batch of d_model columns has no target
            raise ValueError(f"{self.architecture}: d_out (the target's width) must be an integer > 0, got {d_out!r}")
        self.d_in, self.d_out = d_model, d_out  # set first: `init_member` reads them
        super().__init__(d_model, n_latents, members, **options)
        self.b_dec = nn.Parameter(torch.zeros(self.n_members, self.d_out))  # [K, d_out]
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.n_members, self.d_in, self.d_out))  # [K, d_in, d_out]
        self.register_buffer("target_scale", torch.tensor(1.0))  # the target's training scale (E|y|^2 = d_out)
        self.batch: Tensor | None = None  # the scaled batch of the forward under way

    def init_member(self, seed: int) -> tuple[Tensor, Tensor]:
        """Decoder rows (in the output space) and encoder columns (in the input space) of one member,
        both random at the decoder's initial norm, from its seed alone."""
        generator = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(self.n_latents, self.d_out, generator=generator)  # [n_latents, d_out]
        w_enc = torch.randn(self.n_latents, self.d_in, generator=generator)  # [n_latents, d_in]
        w_dec *= self.decoder_init_norm / w_dec.norm(dim=-1, keepdim=True)
        w_enc *= self.decoder_init_norm / w_enc.norm(dim=-1, keepdim=True)
        return w_enc.t().contiguous(), w_dec

    def input_of(self, x: Tensor) -> Tensor:
        """The input columns `[B, d_in]` of a scaled batch `[B, d_in + d_out]`."""
        return x[:, : self.d_in]

    def target_of(self, x: Tensor) -> Tensor:
        """The target columns of a scaled batch, on the target's training scale, `[B, d_out]`."""
        return x[:, self.d_in :].float() * (self.target_scale / self.input_scale)

    def encoder_input(self, x: Tensor) -> Tensor:
        return self.input_of(x)

    def encoder_bias(self) -> Tensor:
        """b_enc `[K, 1, n_latents]`: the input is not shifted by b_dec (the output's bias)."""
        return self.b_enc.unsqueeze(1)

    def forward(self, x: Tensor, *args, **kwargs):
        self.batch = x  # the skip path reads its input columns (`decode`)
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            self.batch = None

    def decode(self, latent_acts: Tensor, latent_indices: Tensor | None = None, bias: bool = True) -> Tensor:
        """The base's decode; with the bias (a whole reconstruction, not AuxK's part), plus the skip path."""
        out = super().decode(latent_acts, latent_indices, bias)
        if not (bias and self.skip):
            return out
        inputs = self.input_of(self.batch)
        return out + self.matmul(inputs.expand(self.n_members, *inputs.shape), self.W_skip)

    def output(self, x: Tensor, sae_out: Tensor, *args, **kwargs):
        return super().output(self.target_of(x), sae_out, *args, **kwargs)

    def auxk_from(self, x: Tensor, *args) -> Tensor | None:
        return super().auxk_from(self.target_of(x), *args)

    @torch.no_grad()
    def init_decoder_bias(self, x: Tensor) -> None:
        super().init_decoder_bias(self.target_of(x))

    # -- export -------------------------------------------------------------------------------------
    def member_config(self, index: int) -> dict:
        return {**super().member_config(index), "d_out": self.d_out, "apply_b_dec_to_input": False}

    @torch.no_grad()
    def member_state(self, index: int) -> dict[str, Tensor]:
        """Weights for raw inputs x and raw targets y. Training saw s * x and t * y: latents of raw x are
        those of s * x divided by s (b_enc / s, thresholds / s, as for an SAE), and y = (s / t) (W_dec f
        + W_skip x) + b_dec / t."""
        state = super().member_state(index)  # b_enc, thresholds / s; b_dec / s (replaced below)
        ratio = float(self.input_scale / self.target_scale)
        state["W_dec"] = self.W_dec[index].float() * ratio
        state["b_dec"] = (self.b_dec[index] / self.target_scale).float()
        if self.skip:
            state["W_skip"] = self.W_skip[index].float().t() * ratio  # SAELens: [d_out, d_in]
        return state


def is_transcoder(architecture: str) -> bool:
    """Whether the named architecture is a transcoder variant."""
    return getattr(ARCHITECTURES.get(architecture), "transcoder", False)


def trains_transcoders(architectures: list[str]) -> bool:
    """Whether a grid of these architectures trains transcoders (then its batches carry each row's target)."""
    return any(is_transcoder(architecture) for architecture in architectures)


def add_variants(name: str) -> None:
    """Register `<name>_transcoder` and `<name>_skip_transcoder` over the registered `name`."""
    base = ARCHITECTURES[name]
    for skip in (False, True):
        saelens = SAELENS_TRANSCODERS[base.saelens_architecture]
        attributes = {
            "skip": skip,
            "saelens_architecture": saelens.replace("transcoder", "skip_transcoder") if skip else saelens,
        }
        kind = f"{'Skip' if skip else ''}Transcoder"
        register(f"{name}_{'skip_' if skip else ''}transcoder")(
            type(f"{kind}{base.__name__}", (Transcoder, base), attributes)
        )


for _name in BASES:
    add_variants(_name)
