"""A stacked ensemble: K sparse autoencoders of one architecture and width trained as one module.

Weights are `[K, ...]` tensors and per-member hyper-parameters are `[K]` tensors, so one forward,
one backward and one optimizer step serve the whole stack. Member i is initialised from its own
seed alone and every reduction is per member, so a member trains exactly as it would alone.

The ensemble works on inputs already scaled so that E[|x|^2] = d_model (`input_scale` holds that
factor); `member_state` folds it back so exported weights take raw activations.

Each architecture (one file each) defines `activate` (inference latents) and `forward` (the
training pass); this base holds the parameters, the matmuls, the dense and sparse decoders, and
the bookkeeping every forward ends with (`output`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from dictsweep.sae.hyperparameters import L1_COEF, TARGET_L0, HyperParameter
from dictsweep.sae.metrics import fvu, l0_from_counts, squared_error
from dictsweep.sae.sparse_decode import sparse_decode, use_triton

SPARSE_DECODE_MAX_DENSITY = 1 / 32  # decode="auto": gather when k <= this fraction of n_latents (CPU crossover)
AUXK_COEF = 1 / 32  # Gao et al. 2024
# the top-k family's encoder backward: autograd through the dense pre-activations, or the fused top-k
# encoder (sparse_encode.py): with a two-stage top-k ("sparse-chunked"), with its weight gradient as a
# CSR matmul on GPUs too ("sparse-csr"); auto: topk.py's rule
ENCODES = ("auto", "dense", "sparse", "sparse-chunked", "sparse-csr")


@dataclass(frozen=True)
class Member:
    """One SAE of an ensemble: its sparsity setting, learning rate and seed."""

    lr: float
    seed: int
    l1_coef: float = 0.0
    k: int = 0
    matryoshka_prefixes: tuple[float, ...] = ()  # matryoshka_batchtopk: prefix widths, fractions of n_latents


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
        cls.sparsity_key = cls.hyperparameters[0].key
        ARCHITECTURES[name] = cls
        return cls

    return add


def build_ensemble(architecture: str, d_model: int, n_latents: int, members: list[Member], **options) -> "Ensemble":
    """Make an ensemble of the named architecture (one of `ARCHITECTURES`)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](d_model, n_latents, members, **options)


class Ensemble(nn.Module):
    """Base of every architecture: parameters, encoder and decoder matmuls, outputs and export."""

    architecture: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = "standard"
    decoder_init_norm: ClassVar[float] = 0.1
    unit_norm_decoder: ClassVar[bool] = False
    dead_latents: ClassVar[str] = "none"  # how training revives dead latents: none, auxk, resample
    decoder_bias_from_data: ClassVar[bool] = False  # b_dec starts at the first batch's mean (else 0)
    budget_steps: ClassVar[int] = 0  # default optimizer steps over the budget (0: one a batch; see train.step_rows)
    hyperparameters: ClassVar[tuple[HyperParameter, ...]] = (L1_COEF, TARGET_L0)  # its grid keys besides lr and seed
    sparsity_key: ClassVar[str] = "l1_coef"  # the grid key that sets its sparsity: hyperparameters[0]'s

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        members: list[Member],
        kernel: str = "bmm",
        decode: str = "auto",
        encode: str = "auto",
    ):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if decode not in ("auto", "dense", "sparse"):
            raise ValueError(f"decode must be auto, dense or sparse, got {decode!r}")
        if encode not in ENCODES:
            raise ValueError(f"encode must be one of {', '.join(ENCODES)}, got {encode!r}")
        self.d_model, self.n_latents, self.members = d_model, n_latents, list(members)
        self.kernel, self.decoding, self.encoding = kernel, decode, encode
        inits = [self.init_member(member.seed) for member in members]
        self.W_enc = nn.Parameter(torch.stack([w_enc for w_enc, _ in inits]))  # [K, d_model, n_latents]
        self.W_dec = nn.Parameter(torch.stack([w_dec for _, w_dec in inits]))  # [K, n_latents, d_model]
        self.b_enc = nn.Parameter(torch.zeros(len(members), n_latents))  # [K, n_latents]
        self.b_dec = nn.Parameter(torch.zeros(len(members), d_model))  # [K, d_model]
        self.register_buffer("lr", torch.tensor([m.lr for m in members], dtype=torch.float32))
        self.register_buffer("l1_coef", torch.tensor([m.l1_coef for m in members], dtype=torch.float32))
        self.register_buffer("k", torch.tensor([m.k for m in members], dtype=torch.long))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.warming_up = False  # set by the trainer while the sparsity warm-up (train.l1_warmup_fraction) runs

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
    def matmul(self, inputs: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """`bias + inputs @ weight` for each member: `[K, 1, m] + [K, B, j] @ [K, j, m] -> [K, B, m]`."""
        if self.kernel == "loop":
            if bias is None:
                return torch.stack([inputs[i] @ weight[i] for i in range(len(weight))])
            return torch.stack([torch.addmm(bias[i], inputs[i], weight[i]) for i in range(len(weight))])
        return torch.bmm(inputs, weight) if bias is None else torch.baddbmm(bias, inputs, weight)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations `[K, B, n_latents]` of a batch `[B, d_model]` (decoder bias removed first).

        (x - b_dec) @ W_enc is computed as x @ W_enc + (b_enc - b_dec @ W_enc): the batch is shared by
        every member and the gradient of b_dec costs a vector product instead of a batch matmul.
        (Folding the biases into the matmuls as an extra row of ones costs more than it saves: the
        odd width d_model + 1 slows every matmul by 10-20%.)
        """
        inputs = self.encoder_input(x)
        return self.matmul(inputs.expand(self.n_members, *inputs.shape), self.W_enc, self.encoder_bias())

    def encoder_input(self, x: Tensor) -> Tensor:
        """What the encoder reads of a scaled batch: the whole row (a transcoder: its input columns)."""
        return x

    def encoder_bias(self) -> Tensor:
        """b_enc - b_dec @ W_enc, `[K, 1, n_latents]`: the bias of the pre-activations of unshifted inputs."""
        return self.b_enc.unsqueeze(1) - torch.bmm(self.b_dec.unsqueeze(1), self.W_enc)

    def sparse_decode(self, k: int) -> bool:
        """Whether k active latents per row are decoded by gathering decoder rows instead of a matmul."""
        if self.decoding == "auto":
            return k <= SPARSE_DECODE_MAX_DENSITY * self.n_latents
        return self.decoding == "sparse"

    def decode(self, latent_acts: Tensor, latent_indices: Tensor | None = None, bias: bool = True) -> Tensor:
        """Reconstruction `[K, B, d_model]` from dense latents, or from values and indices `[K, B, k]`."""
        b_dec = self.b_dec.unsqueeze(1) if bias else None  # [K, 1, d_model]
        if latent_indices is None:
            return self.matmul(latent_acts, self.W_dec, b_dec)
        if not self.sparse_decode(latent_indices.shape[-1]):
            return self.matmul(self.densify(latent_acts, latent_indices), self.W_dec, b_dec)
        out = self.gather_decode(latent_acts, latent_indices)
        return out + b_dec if bias else out

    def gather_decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Sum of the selected decoder rows weighted by their values, `[K, B, d_model]`, never
        materialising `[K, B, n_latents]` latents (forward or backward).

        On GPUs a Triton kernel (`sparse_decode.py`); on CPUs `embedding_bag`, where the stack is
        one table `[K * n_latents, d_model]`; member i's indices are offset by i * n.
        """
        if use_triton(values):  # GPUs: the Triton kernel reads the fp32 table, accumulates in fp32
            return sparse_decode(values, indices, self.W_dec)
        n_members, rows, k = indices.shape
        width = self.W_dec.shape[-1]  # d_model (a transcoder's: d_out)
        offsets = torch.arange(n_members, device=indices.device).view(-1, 1, 1) * self.n_latents
        # CUDA's embedding_bag has no bf16 backward: there (no Triton) it gathers in fp32
        dtype = torch.float32 if values.is_cuda else values.dtype
        table = self.W_dec.reshape(-1, width).to(dtype)  # [K * n_latents, d_model]
        out = nn.functional.embedding_bag(
            (indices + offsets).view(-1, k), table, mode="sum", per_sample_weights=values.reshape(-1, k).to(dtype)
        )  # [K * B, d_model]
        return out.view(n_members, rows, width).to(values.dtype)

    def densify(self, values: Tensor, indices: Tensor) -> Tensor:
        """Dense `[K, B, n_latents]` latents from `[K, B, k]` values and indices (added: a padded
        entry, value 0, may repeat an index of its row)."""
        dense = values.new_zeros(*values.shape[:-1], self.n_latents)
        return dense.scatter_add(-1, indices, values)

    # -- what each architecture defines ---------------------------------------------------------
    def activate(self, pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inference latents from pre-activations: dense `[K, B, n]`, or values and indices `[K, B, k]`."""
        raise NotImplementedError

    def forward(
        self,
        x: Tensor,
        sparsity_scale: Tensor | float = 1.0,
        dead_mask: Tensor | None = None,
        auxk_coef: float = AUXK_COEF,
        auxk_k: int = 0,
    ) -> EnsembleOutput:
        """Encode, decode and score a scaled batch `[B, d_model]` for every member.

        `dead_mask [K, n_latents]` marks latents dead for a window (for AuxK; None: none dead);
        `auxk_coef` and `auxk_k` (0: d_model // 2) set the AuxK loss where the architecture has one.
        """
        raise NotImplementedError

    def target_of(self, x: Tensor) -> Tensor:
        """What the dictionary reconstructs of a scaled batch: `x` itself (a transcoder: its target columns)."""
        return x

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inference latents of a scaled batch `[B, d_model]` for every member."""
        return self.activate(self.pre_acts(x))

    # -- what every forward ends with -----------------------------------------------------------
    def output(
        self,
        x: Tensor,
        sae_out: Tensor,
        latent_acts: Tensor,
        latent_indices: Tensor | None,
        fire_counts: Tensor,
        sparsity_loss: Tensor,
        aux_loss: Tensor | None = None,
    ) -> EnsembleOutput:
        """Losses (float32, also under autocast) and metrics of one forward pass."""
        mse = squared_error(x, sae_out)  # [K]
        aux_loss = torch.zeros_like(mse) if aux_loss is None else aux_loss
        return EnsembleOutput(
            sae_out=sae_out,
            latent_acts=latent_acts,
            latent_indices=latent_indices,
            fire_counts=fire_counts,
            mse=mse,
            fvu=fvu(x, sae_out, error=mse),
            l0=l0_from_counts(fire_counts, x.shape[0]),
            sparsity_loss=sparsity_loss,
            aux_loss=aux_loss,
            loss=mse + sparsity_loss + aux_loss,
        )

    def fire_counts(self, latent_acts: Tensor, latent_indices: Tensor | None) -> Tensor:
        """Rows of the batch on which each latent fired, `[K, n_latents]` (latents are >= 0)."""
        if latent_indices is None:  # sign, not `> 0`: torch sums a bool tensor over rows 2-3x slower
            return latent_acts.detach().sign().sum(1, dtype=torch.float32)
        fired = latent_acts.detach() > 0
        counts = torch.zeros(self.n_members, self.n_latents, device=fired.device)
        return counts.scatter_add_(-1, latent_indices.flatten(1), fired.flatten(1).float())

    def aim_at_l0(self, x: Tensor) -> dict[str, Tensor]:
        """Where the architecture can: set its parameters from a scaled batch `[B, d_model]` so each
        member with an L0 target fires at about that target; returns what changed: parameter name ->
        mask (for the optimizer's moments). The base has nothing to set."""
        return {}

    # -- constraints around the optimizer step --------------------------------------------------
    @torch.no_grad()
    def constrain_gradients(self) -> None:
        """Before the optimizer step: for unit-norm decoders, drop the gradient along each row (the
        rows are unit norm here: initialised so, renormalised after every step)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec).unsqueeze(-1)  # [K, n_latents, 1]
            self.W_dec.grad.addcmul_(parallel, self.W_dec, value=-1.0)

    @torch.no_grad()
    def init_decoder_bias(self, x: Tensor) -> None:
        """Every member's b_dec := the mean of the first (scaled) batch `x [B, d_model]`, so that the
        encoder starts on centred inputs (Gao et al. 2024 start at the geometric median; the mean is
        what we measured, and cheaper)."""
        self.b_dec.copy_(x.float().mean(0).expand_as(self.b_dec))

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
