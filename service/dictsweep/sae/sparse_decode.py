"""Sparse top-k decoding on GPUs: a Triton kernel for the weighted sum of the k selected decoder
rows of each row, forward and backward, for every member of a stack at once.

out[m, b] = sum_j values[m, b, j] * W_dec[m, indices[m, b, j]]  (fp32 accumulation)

Backward: the decoder gradient is a scatter-add of values[m, b, j] * grad_out[m, b] into the
selected rows (fp32 atomics, straight into the fp32 master weights' gradient: no bf16 copy of the
table is made; entries of value 0, such as the padding of batchtopk's shorter rows, are skipped in
both directions), and the value gradient is the dot product of grad_out[m, b] with each selected
row. Neither direction materialises `[K, B, n_latents]`. The same scatter (`scatter_outer`) builds
the fused top-k encoder's weight gradient (`sparse_encode.py`).

Triton is imported on first use only, so CPU users never need it (CPUs decode with
`embedding_bag`, see `Ensemble.gather_decode`). `TRITON_INTERPRET=1` runs the kernels on CPU
tensors (slowly): the tests prove indexing, masking and accumulation that way.
The kernels use only `tl.load`, `tl.store`, `tl.atomic_add`, `tl.sum` and `tl.arange`, which
Triton 3.6 and later accept alike.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK_J = 16  # selected rows handled together by one program
BLOCK_D = 128  # decoder columns handled together by one program


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (it ships with torch's CUDA wheels; CPU wheels lack it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: Tensor) -> bool:
    """Whether the Triton kernels (the sparse decode, the encoder's weight-gradient scatter) take
    `tensor`: on CUDA tensors where Triton imports."""
    return tensor.is_cuda and triton_available()


@functools.cache
def kernels():
    """The forward and backward kernels, compiled by Triton on first launch."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(
        values,
        indices,
        table,
        out,
        n_rows_per_member,
        n_latents,
        d_model,
        k,
        BLOCK_J: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # one program: one row (member m, batch row b) x one block of BLOCK_D output columns
        row = tl.program_id(0).to(tl.int64)  # m * B + b
        member = row // n_rows_per_member
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        col_ok = cols < d_model
        member_table = table + member * n_latents * d_model
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, k, BLOCK_J):
            j = start + tl.arange(0, BLOCK_J)  # [BLOCK_J]
            j_ok = j < k
            index = tl.load(indices + row * k + j, mask=j_ok, other=0).to(tl.int64)
            value = tl.load(values + row * k + j, mask=j_ok, other=0.0).to(tl.float32)
            used = j_ok & (value != 0.0)  # a zero (padding, a ReLU'd value) adds nothing: its row is not read
            rows = tl.load(
                member_table + index[:, None] * d_model + cols[None, :], mask=used[:, None] & col_ok[None, :], other=0.0
            ).to(tl.float32)  # [BLOCK_J, BLOCK_D]
            acc += tl.sum(value[:, None] * rows, axis=0)
        tl.store(out + row * d_model + cols, acc.to(out.dtype.element_ty), mask=col_ok)

    @triton.jit
    def backward_kernel(
        grad_out,
        values,
        indices,
        table,
        grad_values,
        grad_table,
        n_rows_per_member,
        n_latents,
        d_model,
        k,
        NEED_VALUES: tl.constexpr,
        NEED_TABLE: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # one program: one row x BLOCK_J of its selected entries, looping over all columns
        row = tl.program_id(0).to(tl.int64)
        member = row // n_rows_per_member
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        j_ok = j < k
        index = tl.load(indices + row * k + j, mask=j_ok, other=0).to(tl.int64)
        value = tl.load(values + row * k + j, mask=j_ok, other=0.0).to(tl.float32)
        offset = member * n_latents * d_model + index[:, None] * d_model  # [BLOCK_J, 1]
        dot = tl.zeros([BLOCK_J], dtype=tl.float32)
        for start in range(0, d_model, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < d_model
            mask = j_ok[:, None] & col_ok[None, :]
            grad = tl.load(grad_out + row * d_model + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
            if NEED_VALUES:
                rows = tl.load(table + offset + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dot += tl.sum(rows * grad[None, :], axis=1)
            if NEED_TABLE:  # a zero value adds nothing: no atomic (padded rows would all hit latent 0's row)
                used = mask & (value != 0.0)[:, None]
                tl.atomic_add(grad_table + offset + cols[None, :], value[:, None] * grad[None, :], mask=used)
        if NEED_VALUES:
            tl.store(grad_values + row * k + j, dot.to(grad_values.dtype.element_ty), mask=j_ok)

    return forward_kernel, backward_kernel


class SparseDecode(torch.autograd.Function):
    """`[K, B, k]` values and indices, decoder `[K, n_latents, d_model]` -> `[K, B, d_model]` in the
    values' dtype (the decoder is read in its own dtype, usually the fp32 master weights)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, table: Tensor) -> Tensor:
        values, indices, table = values.contiguous(), indices.contiguous(), table.contiguous()
        n_members, rows, k = values.shape
        n_latents, d_model = table.shape[1:]
        out = values.new_empty(n_members, rows, d_model)  # [K, B, d_model]
        forward_kernel, _ = kernels()
        grid = (n_members * rows, -(-d_model // BLOCK_D))
        forward_kernel[grid](values, indices, table, out, rows, n_latents, d_model, k, BLOCK_J=BLOCK_J, BLOCK_D=BLOCK_D)
        ctx.save_for_backward(values, indices, table)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, table = ctx.saved_tensors
        need_values, _, need_table = ctx.needs_input_grad
        if not (need_values or need_table):
            return None, None, None
        n_members, rows, k = values.shape
        n_latents, d_model = table.shape[1:]
        grad_out = grad_out.contiguous()
        grad_values = torch.empty_like(values) if need_values else values  # [K, B, k]
        grad_table = (
            torch.zeros(table.shape, dtype=torch.float32, device=table.device) if need_table else table
        )  # [K, n_latents, d_model], fp32 for the atomics
        _, backward_kernel = kernels()
        grid = (n_members * rows, -(-k // BLOCK_J))
        backward_kernel[grid](
            grad_out,
            values,
            indices,
            table,
            grad_values,
            grad_table,
            rows,
            n_latents,
            d_model,
            k,
            NEED_VALUES=need_values,
            NEED_TABLE=need_table,
            BLOCK_J=BLOCK_J,
            BLOCK_D=BLOCK_D,
        )
        return (grad_values if need_values else None, None, grad_table.to(table.dtype) if need_table else None)


def scatter_outer(values: Tensor, indices: Tensor, rows: Tensor, n_latents: int) -> Tensor:
    """`[K, n_latents, d]` fp32: values[m, b, j] * rows[m, b] summed into row indices[m, b, j] of member
    m, from `[K, B, k]` values and indices and `rows [K, B, d]` (the decoder backward's scatter; the
    top-k encoder's weight gradient, transposed). Entries of value 0 add nothing and cost no atomic."""
    values, indices, rows = values.contiguous(), indices.contiguous(), rows.contiguous()
    n_members, n_rows, k = values.shape
    d_model = rows.shape[-1]
    out = torch.zeros(n_members, n_latents, d_model, dtype=torch.float32, device=values.device)
    _, backward_kernel = kernels()
    grid = (n_members * n_rows, -(-k // BLOCK_J))
    backward_kernel[grid](
        rows,
        values,
        indices,
        out,
        values,
        out,
        n_rows,
        n_latents,
        d_model,
        k,
        NEED_VALUES=False,
        NEED_TABLE=True,
        BLOCK_J=BLOCK_J,
        BLOCK_D=BLOCK_D,
    )
    return out


@torch.compiler.disable
def sparse_decode(values: Tensor, indices: Tensor, table: Tensor) -> Tensor:
    """Sum of the selected rows of each member's decoder `table [K, n, d]` weighted by `values`,
    `[K, B, k]` each: `[K, B, d]`, in the values' dtype. A compiled forward runs it as it is (a
    graph break: the kernel is opaque to the compiler anyway, and its launch is not traced)."""
    return SparseDecode.apply(values, indices, table)
