"""The top-k family's fused encoder: the dense pre-activation matmul and the selection forward,
and a backward over the selected latents only.

x needs no gradient, so of the encoder's backward only the weight and bias gradients remain, and
the loss reaches the pre-activations only at the latents each row kept (its top k, batchtopk's
share of the batch, AuxK's dead latents): a gradient of B x w entries per member instead of a
dense `[K, B, n_latents]` one and a dense matmul.

grad_W_enc[m, :, j] = sum over the (b, s) that selected latent j of grad[m, b, s] * x[b]
grad_bias[m, j]     = sum over the same (b, s) of grad[m, b, s]

An entry gets the gradient only where its value is > 0 (ReLU, a member's k below the widest,
batchtopk's padding and AuxK's ReLU all leave exact zeros), as the dense path's autograd gives.
The weight gradient is a scatter of outer products: on GPUs the Triton scatter kernel of the
sparse decoder (fp32 atomics, `sparse_decode.scatter_outer`), or a sparse CSR matmul (rows: member
x latent, columns: batch rows) times x, in fp32, which CPUs always use.

The selection runs inside the forward on the detached pre-activations, which are freed after it:
`select(pre)` returns the (values, indices) pairs `[K, B, w]` whose values the loss uses.
`chunked_topk` is an exact two-stage top-k (each chunk's top k, then the top k of those).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from dictsweep.sae.sparse_decode import scatter_outer, use_triton

CHUNK_MIN = 1024  # chunked_topk: the smallest chunk, and at least CHUNK_PER_K x k
CHUNK_PER_K = 8

Selection = list[tuple[Tensor, Tensor]]


def chunked_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`scores.topk(k, dim=-1, sorted=True)` in two stages: the top k of each chunk of the last
    dimension, then the top k of those. Exact (ties may pick other positions of equal value); a
    width that no power-of-two chunk of at least max(CHUNK_MIN, CHUNK_PER_K x k) divides into two or
    more chunks takes the one-stage top-k."""
    width = scores.shape[-1]
    chunk = max(CHUNK_MIN, CHUNK_PER_K * k)
    chunk = 1 << (chunk - 1).bit_length()  # a power of two
    if width % chunk or width < 2 * chunk:
        return scores.topk(k, dim=-1, sorted=True)
    values, where = scores.unflatten(-1, (width // chunk, chunk)).topk(k, dim=-1, sorted=False)  # [..., c, k]
    where = where + torch.arange(0, width, chunk, device=scores.device).unsqueeze(-1)  # chunk offsets
    values, pick = values.flatten(-2).topk(k, dim=-1, sorted=True)  # [..., k]
    return values, where.flatten(-2).gather(-1, pick)


def weight_gradient(x: Tensor, grad: Tensor, indices: Tensor, n_latents: int, csr: bool = False) -> Tensor:
    """sum_b x[b]^T (x) grad[m, b, s] into latent indices[m, b, s]: `[K, d_model, n_latents]` (a
    transposed view of `[K, n_latents, d_model]`), fp32, from x `[B, d_model]` and `[K, B, w]`: the
    Triton scatter where it runs (unless `csr`), else a CSR matmul."""
    n_members, rows, width = grad.shape
    d_model = x.shape[-1]
    if use_triton(grad) and not csr:
        return scatter_outer(grad, indices, x.float().expand(n_members, rows, d_model), n_latents).transpose(1, 2)
    # a sparse [K * n_latents, B] matrix (rows sorted: CSR) times x; on CPUs of the non-zero entries
    # only, on GPUs of all (no host sync: zeros add nothing)
    member = torch.arange(n_members, device=grad.device).view(-1, 1, 1)
    latent = indices + member * n_latents  # [K, B, w]
    batch_row = torch.arange(rows, device=grad.device).view(1, -1, 1).expand(n_members, rows, width)
    if grad.is_cuda:
        latent, batch_row, grad = latent.flatten(), batch_row.flatten(), grad.flatten()
    else:
        used = grad != 0
        latent, batch_row, grad = latent[used], batch_row[used], grad[used]  # [N]
    latent, order = latent.sort()
    crow = torch.searchsorted(latent, torch.arange(n_members * n_latents + 1, device=grad.device))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR times dense is what we use of it
        warnings.simplefilter("ignore", UserWarning)
        selected = torch.sparse_csr_tensor(
            crow, batch_row[order], grad[order], (n_members * n_latents, rows), check_invariants=False
        )
    return (selected @ x.float()).view(n_members, n_latents, d_model).transpose(1, 2)


class SparseEncode(torch.autograd.Function):
    """x `[B, d_model]`, W_enc `[K, d_model, n_latents]`, bias `[K, 1, n_latents]` -> the values of each
    selection `[K, B, w_i]` (with gradients), then their indices."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor, matmul: Callable, select: Callable, csr: bool = False
    ) -> tuple:
        n_members, n_latents = weight.shape[0], weight.shape[-1]
        pre = matmul(x.expand(n_members, *x.shape), weight, bias)  # [K, B, n_latents], freed after the selection
        selection: Selection = select(pre)
        values = [value for value, _ in selection]
        indices = [index for _, index in selection]
        ctx.mark_non_differentiable(*indices)
        ctx.save_for_backward(x, weight if ctx.needs_input_grad[0] else None, *values, *indices)
        ctx.shape, ctx.weight_dtype, ctx.bias_dtype, ctx.csr = (n_members, n_latents), weight.dtype, bias.dtype, csr
        return (*values, *indices)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        x, weight, *saved = ctx.saved_tensors
        count = len(saved) // 2
        values, indices = saved[:count], saved[count:]
        # the loss reaches a pre-activation only where its selected value is > 0
        grad = torch.cat(
            [
                (g.float() if g is not None else torch.zeros_like(v, dtype=torch.float32)) * (v > 0)
                for g, v in zip(grads[:count], values)
            ],
            dim=-1,
        )  # [K, B, sum of w]
        index = torch.cat(indices, dim=-1)
        n_members, n_latents = ctx.shape
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        if need_bias:
            grad_bias = torch.zeros(n_members, n_latents, device=grad.device)
            grad_bias = grad_bias.scatter_add_(1, index.flatten(1), grad.flatten(1)).unsqueeze(1).to(ctx.bias_dtype)
        if need_weight:
            grad_weight = weight_gradient(x, grad, index, n_latents, ctx.csr).to(ctx.weight_dtype)
        if need_x:  # not in training (x is data); dense, for completeness
            dense = grad.new_zeros(n_members, x.shape[0], n_latents).scatter_add_(-1, index, grad)
            grad_x = torch.bmm(dense, weight.float().transpose(1, 2)).sum(0).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


@torch.compiler.disable
def sparse_encode(
    x: Tensor, weight: Tensor, bias: Tensor, matmul: Callable, select: Callable, csr: bool = False
) -> Selection:
    """The (values, indices) pairs that `select` takes from the pre-activations `matmul(x, weight,
    bias)`, `[K, B, w]` each, with gradients to weight and bias over the selected entries only (the
    weight gradient as a CSR matmul where `csr`, else as `weight_gradient` chooses). A compiled
    forward runs it as it is (a graph break, as the sparse decoder)."""
    outputs = SparseEncode.apply(x, weight, bias, matmul, select, csr)
    count = len(outputs) // 2
    return list(zip(outputs[:count], outputs[count:]))
