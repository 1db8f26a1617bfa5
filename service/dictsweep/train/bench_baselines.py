"""`dictsweep bench ica`: torch FastICA against scikit-learn's FastICA on the same data.

Both fit a linear mixture of independent non-Gaussian sources with the same contrast (logcosh),
`tol`, `max_iter` and initial unmixing; we report each one's seconds, iterations and how well
its sources match the true ones.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import Tensor

from dictsweep.sae.baselines import fast_ica
from dictsweep.train.kernels import synchronize


def ica_mixture(rows: int, dim: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(x [rows, dim] float32, sources [rows, dim], mixing [dim, dim]): x = sources @ mixing.T + offset,
    sources independent with unit variance, alternately Laplace (heavy-tailed) and uniform (light)."""
    generator = torch.Generator().manual_seed(seed)
    laplace = torch.empty(rows, dim).exponential_(generator=generator) / 2**0.5
    laplace *= torch.randint(0, 2, (rows, dim), generator=generator) * 2 - 1
    uniform = (torch.rand(rows, dim, generator=generator) * 2 - 1) * 3**0.5
    sources = torch.where(torch.arange(dim) % 2 == 0, laplace, uniform)  # [rows, dim]
    mixing = torch.randn(dim, dim, generator=generator) / dim**0.5  # [dim, dim]
    offset = torch.randn(dim, generator=generator)  # [dim]
    return sources @ mixing.t() + offset, sources, mixing


def source_recovery(estimated: Tensor, sources: Tensor) -> Tensor:
    """|correlation| of each true source `[rows, m]` with the estimate greedily matched to it, `[m]`."""

    def standardize(columns: Tensor) -> Tensor:
        columns = columns.double()
        return (columns - columns.mean(0)) / columns.std(0, correction=0)

    corr = (standardize(sources).t() @ standardize(estimated)).abs() / len(sources)  # [m, m_est]
    matched = torch.zeros(len(corr), dtype=torch.float64)
    for _ in range(min(corr.shape)):
        flat = int(corr.argmax())
        source, component = divmod(flat, corr.shape[1])
        matched[source] = corr[source, component]
        corr[source, :], corr[:, component] = -1, -1
    return matched


def recovery(x: Tensor, sources: Tensor, mean: Tensor, components: Tensor) -> float:
    """Mean matched |correlation| of the true sources with those of an unmixing `[m, dim]`."""
    estimated = (x.double() - mean.cpu().double()) @ components.cpu().double().t()  # [rows, m]
    return float(source_recovery(estimated, sources).mean())


def bench_ica(
    rows: int = 200_000,
    dim: int = 256,
    tol: float = 1e-4,
    max_iter: int = 200,
    device: str = "cpu",
    sklearn: bool = True,
    batch_rows: int = 65_536,
    seed: int = 0,
) -> dict:
    """Fit both on one mixture; returns the JSON-ready result."""
    x, sources, _ = ica_mixture(rows, dim, seed)
    w_init = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    data = x.to(device)
    synchronize(device)
    start = time.perf_counter()
    ica = fast_ica(lambda: data.split(batch_rows), tol=tol, max_iter=max_iter, w_init=w_init, device=device)
    synchronize(device)
    result = {
        "rows": rows,
        "dim": dim,
        "tol": tol,
        "max_iter": max_iter,
        "device": device,
        "torch_seconds": time.perf_counter() - start,
        "torch_iterations": ica.n_iter,
        "torch_converged": ica.converged,
        "torch_recovery": recovery(x, sources, ica.mean, ica.components),
    }
    if device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if sklearn:
        result.update(bench_sklearn(x, sources, w_init, tol, max_iter))
        result["speedup"] = result["sklearn_seconds"] / result["torch_seconds"]
    return result


def bench_sklearn(x: Tensor, sources: Tensor, w_init: Tensor, tol: float, max_iter: int) -> dict:
    """scikit-learn's FastICA (CPU) on the same data with the same settings."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    model = FastICA(
        n_components=x.shape[1],
        fun="logcosh",
        tol=tol,
        max_iter=max_iter,
        w_init=w_init.numpy(),
        whiten="unit-variance",
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x.numpy())
    seconds = time.perf_counter() - start
    return {
        "sklearn_seconds": seconds,
        "sklearn_iterations": int(model.n_iter_),
        "sklearn_converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "sklearn_recovery": recovery(x, sources, torch.from_numpy(model.mean_), torch.from_numpy(model.components_)),
    }
