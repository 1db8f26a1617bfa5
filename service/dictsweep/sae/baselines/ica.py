"""FastICA in torch: scikit-learn's symmetric fixed point with the logcosh contrast, on streamed data.

Whitening comes from a streaming PCA. Each fixed-point iteration then takes its expectations
E[g(Wz) z^T] and E[g'(Wz)] exactly, over one full pass of `passes()` (a function returning a fresh
iterable of batches), summed in float64: memory is one batch plus O(d_model^2) whatever the number
of rows, and the update and its stopping test are scikit-learn's, so both reach the same unmixing.
Mini-batch (stochastic) updates would save passes but move the fixed point and make `tol` moot.
For data in object storage, pass a sample held on the device (`sample.split(65536)`): each
iteration then costs two matmuls over the sample and no reads.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import torch
from torch import Tensor

from dictsweep.sae.baselines.pca import PCA, fit_pca

Passes = Callable[[], Iterable[Tensor]]


class FastICA(NamedTuple):
    """A fitted unmixing, in float64: sources = (x - mean) @ components.T, with unit variance."""

    mean: Tensor
    """Mean activation, `[d_model]`."""
    components: Tensor
    """Unmixing rows, `[n_components, d_model]` (scikit-learn's `components_`)."""
    mixing: Tensor
    """Pseudo-inverse of `components`, `[d_model, n_components]`: x ~ mean + sources @ mixing.T."""
    n_iter: int
    """Fixed-point iterations run (passes over the data after the whitening pass)."""
    converged: bool
    """Whether the change fell below `tol` within `max_iter` iterations."""


def whitening(pca: PCA, n_components: int) -> Tensor:
    """`[n_components, d_model]`: maps centred rows onto the top axes with unit variance."""
    variance = pca.variance[:n_components].clamp_min(torch.finfo(torch.float64).eps * 10)
    return pca.components[:n_components] / variance.sqrt().unsqueeze(1)


def symmetric_decorrelation(w: Tensor) -> Tensor:
    """(W W^T)^(-1/2) W: the orthogonal matrix nearest to `w [m, m]`."""
    eigenvalues, eigenvectors = torch.linalg.eigh(w @ w.t())
    eigenvalues = eigenvalues.clamp_min(torch.finfo(w.dtype).tiny)
    return (eigenvectors / eigenvalues.sqrt()) @ eigenvectors.t() @ w


def fixed_point(w: Tensor, white: Tensor, mean: Tensor, passes: Passes, alpha: float, dtype: torch.dtype) -> Tensor:
    """One pass: E[g(Wz) z^T] - diag(E[g'(Wz)]) W with z the whitened rows, g = tanh(alpha .)."""
    unmix = (w @ white).to(dtype)  # [m, d_model]
    center = mean.to(dtype)
    sum_g_x = torch.zeros_like(white)  # [m, d_model], float64
    sum_g_squared = torch.zeros(len(w), dtype=torch.float64, device=w.device)  # [m]
    rows = 0
    for batch in passes():
        centred = batch.to(device=w.device, dtype=dtype) - center  # [B, d_model]
        g = (centred @ unmix.t()).mul_(alpha).tanh_()  # [B, m]
        sum_g_x += (g.t() @ centred).double()
        sum_g_squared += torch.linalg.vector_norm(g, dim=0).double().square()
        rows += len(batch)
    if rows == 0:
        raise ValueError(
            "fast_ica: a pass gave no rows; `passes` must return a fresh iterable on each call "
            "(e.g. `lambda: sample.split(65536)`), not a used-up iterator"
        )
    mean_g_prime = alpha * (1 - sum_g_squared / rows)  # g' = alpha (1 - tanh^2)
    return symmetric_decorrelation(sum_g_x @ white.t() / rows - mean_g_prime.unsqueeze(1) * w)


def fast_ica(
    passes: Passes,
    pca: PCA | None = None,
    n_components: int | None = None,
    *,
    tol: float = 1e-4,
    max_iter: int = 200,
    alpha: float = 1.0,
    w_init: Tensor | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> FastICA:
    """Fit FastICA (parallel, logcosh, unit-variance sources) with one pass per iteration.

    `pca` (from a streaming pass) gives the whitening; without it, a first pass computes it.
    `w_init [n_components, n_components]` defaults to a standard normal matrix drawn from `seed`.
    Batches are moved to `device` (default: the PCA's, else the batches') and multiplied in
    `dtype`; sums and the unmixing stay in float64.
    """
    pca = fit_pca(passes(), device) if pca is None else pca
    device = device or pca.mean.device
    pca = PCA(*(t.to(device) for t in pca))
    d_model = len(pca.mean)
    n_components = n_components or d_model
    if not 1 <= n_components <= d_model:
        raise ValueError(f"n_components={n_components}: must be between 1 and d_model={d_model}")
    white = whitening(pca, n_components)  # [m, d_model]
    if w_init is None:
        w_init = torch.randn(
            n_components, n_components, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
    w = symmetric_decorrelation(w_init.to(device=device, dtype=torch.float64))  # [m, m]
    converged, n_iter = False, 0
    while n_iter < max_iter and not converged:
        new_w = fixed_point(w, white, pca.mean, passes, alpha, dtype)
        change = float(((new_w * w).sum(1).abs() - 1).abs().max())
        w, n_iter, converged = new_w, n_iter + 1, change < tol
    components = w @ white  # [m, d_model]
    return FastICA(
        mean=pca.mean, components=components, mixing=torch.linalg.pinv(components), n_iter=n_iter, converged=converged
    )
