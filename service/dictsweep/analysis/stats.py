"""Per-latent statistics of one streamed pass, in memory that does not grow with the rows.

`LatentStats.add` takes one batch of latent activations `[B, n_latents]` and folds it into
running counts and sums, fixed-bin histograms, the top-N activations per latent (merged batch by
batch) and a random sample of firing rows per latent (for contexts below the top), so no
`[rows, n_latents]` matrix ever exists.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

HIST_LOG10_LOW, HIST_LOG10_HIGH, HIST_BINS_PER_DECADE = -4, 4, 8  # activations 1e-4 .. 1e4, log-spaced
HIST_BINS = (HIST_LOG10_HIGH - HIST_LOG10_LOW) * HIST_BINS_PER_DECADE
NO_ROW = -1


def hist_edges() -> list[float]:
    """The histogram's bin edges (HIST_BINS + 1 values); values outside go to the end bins."""
    return [10 ** (HIST_LOG10_LOW + i / HIST_BINS_PER_DECADE) for i in range(HIST_BINS + 1)]


class Summary(NamedTuple):
    """One dictionary's statistics after the pass (numpy, CPU)."""

    rows: int
    """Rows the pass read."""
    fire_count: np.ndarray
    """Rows on which each latent was > 0, `[n_latents]` int64."""
    act_sum: np.ndarray
    """Sum of each latent's activations, `[n_latents]` float64."""
    act_max: np.ndarray
    """Largest activation of each latent (0 when it never fired), `[n_latents]` float32."""
    hist: np.ndarray
    """Firing activations per log-spaced bin (`hist_edges`), `[n_latents, HIST_BINS]` int64."""
    top_values: np.ndarray
    """The top-N activations of each latent, descending, `[n_latents, top]`; -inf where fewer fired."""
    top_rows: np.ndarray
    """Row keys of `top_values` (`row_keys` of the batch), `[n_latents, top]` int64; -1 where none."""
    sample_values: np.ndarray
    """Activations of a uniform random sample of each latent's firing rows, `[n_latents, samples]`."""
    sample_rows: np.ndarray
    """Row keys of `sample_values`, `[n_latents, samples]` int64; -1 where fewer fired."""


class LatentStats:
    """Running statistics of one dictionary's latents over batches of rows, on one device."""

    def __init__(self, n_latents: int, top: int, samples: int, device: torch.device | str, seed: int = 0):
        self.n_latents, self.top, self.samples = n_latents, top, samples
        self.rows = 0
        self.fire_count = torch.zeros(n_latents, dtype=torch.int64, device=device)  # [n_latents]
        self.act_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)  # [n_latents]
        self.act_max = torch.zeros(n_latents, device=device)  # [n_latents]
        self.hist = torch.zeros(n_latents * HIST_BINS, dtype=torch.int64, device=device)  # [n_latents * bins]
        self.top_values = torch.full((top, n_latents), -math.inf, device=device)  # [top, n_latents]
        self.top_rows = torch.full((top, n_latents), NO_ROW, dtype=torch.int64, device=device)
        # a uniform sample of firing rows: each (row, latent) gets a random priority, the highest are kept
        self.sample_keys = torch.full((samples, n_latents), -1.0, device=device)  # [samples, n_latents]
        self.sample_values = torch.zeros((samples, n_latents), device=device)
        self.sample_rows = torch.full((samples, n_latents), NO_ROW, dtype=torch.int64, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def add(self, acts: Tensor, row_keys: Tensor) -> None:
        """Fold in latent activations `[B, n_latents]` (float32) of rows identified by `row_keys` `[B]`."""
        firing = acts > 0  # [B, n_latents]
        self.rows += acts.shape[0]
        self.fire_count += firing.sum(0)
        self.act_sum += acts.sum(0, dtype=torch.float64)
        torch.maximum(self.act_max, acts.max(0).values, out=self.act_max)
        self._add_hist(acts, firing)
        self.top_values, _, self.top_rows = _merge(self.top_values, self.top_values, self.top_rows,
                                                   acts, acts, row_keys)
        if self.samples:
            keys = torch.rand(acts.shape, generator=self.generator, device=acts.device)  # [B, n_latents]
            keys.masked_fill_(~firing, -1.0)
            self.sample_keys, self.sample_values, self.sample_rows = _merge(
                self.sample_keys, self.sample_values, self.sample_rows, keys, acts, row_keys)

    def _add_hist(self, acts: Tensor, firing: Tensor) -> None:
        row_index, latent = firing.nonzero(as_tuple=True)
        values = acts[row_index, latent]
        bins = ((values.log10() - HIST_LOG10_LOW) * HIST_BINS_PER_DECADE).floor().clamp(0, HIST_BINS - 1)
        self.hist.index_add_(0, latent * HIST_BINS + bins.long(), torch.ones_like(latent))

    def summary(self) -> Summary:
        """The statistics so far, on the CPU, one row per latent."""
        sampled = self.sample_keys >= 0  # [samples, n_latents]; keys are in [0, 1) for firing rows

        def cpu(tensor: Tensor) -> np.ndarray:
            return tensor.cpu().numpy()

        return Summary(rows=self.rows, fire_count=cpu(self.fire_count), act_sum=cpu(self.act_sum),
                       act_max=cpu(self.act_max), hist=cpu(self.hist.view(self.n_latents, HIST_BINS)),
                       top_values=cpu(self.top_values.t()),
                       top_rows=cpu(self.top_rows.where(self.top_values > 0, NO_ROW).t()),
                       sample_values=cpu(self.sample_values.where(sampled, 0.0).t()),
                       sample_rows=cpu(self.sample_rows.where(sampled, NO_ROW).t()))


def _merge(keys: Tensor, values: Tensor, rows: Tensor, batch_keys: Tensor, batch_acts: Tensor,
           row_keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per latent, the entries with the largest keys among the running ones `[count, n]` and a
    batch's `[B, n]`: (keys, values, rows), each `[count, n]`. Non-firing entries (key <= 0 for the
    top, < 0 for samples) never displace firing ones; their rows are reported as NO_ROW later."""
    count = keys.shape[0]
    batch_best, index = batch_keys.topk(min(count, batch_keys.shape[0]), dim=0)  # [<= count, n]
    merged_keys = torch.cat([keys, batch_best])  # [<= 2 count, n]
    merged_values = torch.cat([values, batch_acts.gather(0, index)])
    merged_rows = torch.cat([rows, row_keys[index]])
    best, picked = merged_keys.topk(count, dim=0)
    return best, merged_values.gather(0, picked), merged_rows.gather(0, picked)
