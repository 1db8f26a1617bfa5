"""PCA from a streaming covariance: one pass of `update`, then one eigendecomposition.

Sums are kept in float64 on the device of the accumulator, so millions of rows of float16
activations give the covariance without float32 round-off, in O(d_model^2) memory.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
from torch import Tensor


class PCA(NamedTuple):
    """Principal axes of a stream, in float64, sorted by decreasing variance."""

    mean: Tensor
    """Mean activation, `[d_model]`."""
    components: Tensor
    """Unit principal axes as rows, `[d_model, d_model]`; the first coordinate of each is >= 0."""
    variance: Tensor
    """Variance along each axis (population, over all rows seen), `[d_model]`."""


class StreamingPCA:
    """Accumulates count, sum and sum of outer products of batches; `finish` gives the PCA."""

    def __init__(self, d_model: int, device: torch.device | str = "cpu"):
        self.count = 0
        self.sum = torch.zeros(d_model, dtype=torch.float64, device=device)  # [d_model]
        self.sum_outer = torch.zeros(d_model, d_model, dtype=torch.float64, device=device)  # [d_model, d_model]

    def update(self, batch: Tensor) -> None:
        """Add a batch of activations `[B, d_model]`."""
        x = batch.to(device=self.sum.device, dtype=torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.t() @ x

    def finish(self) -> PCA:
        """Eigendecomposition of the population covariance, axes sorted by decreasing variance."""
        if self.count == 0:
            raise ValueError("StreamingPCA saw no rows: call update() with at least one batch first")
        mean = self.sum / self.count
        covariance = self.sum_outer / self.count - torch.outer(mean, mean)  # [d_model, d_model]
        variance, axes = torch.linalg.eigh(covariance)  # ascending; axes as columns
        variance, axes = variance.flip(0).clamp_min(0.0), axes.flip(1)
        axes = axes * torch.where(axes[0] < 0, -1.0, 1.0)  # sklearn's sign convention
        return PCA(mean=mean, components=axes.t().contiguous(), variance=variance)


def fit_pca(batches: Iterable[Tensor], device: torch.device | str | None = None) -> PCA:
    """The PCA of one pass over batches `[B, d_model]`, summed on `device` (default: the batches')."""
    streaming = None
    for batch in batches:
        streaming = streaming or StreamingPCA(batch.shape[-1], device or batch.device)
        streaming.update(batch)
    if streaming is None:
        raise ValueError("fit_pca got no batches: the stream is empty")
    return streaming.finish()
