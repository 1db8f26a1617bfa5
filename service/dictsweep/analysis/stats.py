"""Per-latent statistics of one streamed pass, in memory that does not grow with the rows.

`LatentStats.add` takes one batch of latent activations `[B, n_latents]`, lists its firing entries
once (row, latent, value) and folds them into running counts and sums, fixed-bin histograms, the
top-N activations per latent and a uniform random sample of each latent's firing rows (for
contexts below the top). Top-N and sample are merged batch by batch, and only entries that beat a
latent's current N-th best take part, so no `[rows, n_latents]` matrix ever exists and after the
first batches the merge touches few entries.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

HIST_LOG10_LOW, HIST_LOG10_HIGH, HIST_BINS_PER_DECADE = -4, 4, 8  # activations 1e-4 .. 1e4, log-spaced
HIST_BINS = (HIST_LOG10_HIGH - HIST_LOG10_LOW) * HIST_BINS_PER_DECADE
NO_ROW = -1
EMPTY = -1.0  # key of an empty top or sample slot: activations are > 0 and priorities >= 0


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
    """The top-N activations of each latent, descending, `[n_latents, top]`; 0 where fewer fired."""
    top_rows: np.ndarray
    """Row keys of `top_values` (`row_keys` of the batch), `[n_latents, top]` int64; -1 where none."""
    sample_values: np.ndarray
    """Activations of a uniform random sample of each latent's firing rows, `[n_latents, samples]`."""
    sample_rows: np.ndarray
    """Row keys of `sample_values`, `[n_latents, samples]` int64; -1 where fewer fired."""


class Best:
    """Per latent, the `count` entries with the largest keys so far, each with a value and a row key."""

    def __init__(self, n_latents: int, count: int, device: torch.device | str):
        self.keys = torch.full((n_latents, count), EMPTY, device=device)  # [n_latents, count], descending
        self.values = torch.zeros((n_latents, count), device=device)
        self.rows = torch.full((n_latents, count), NO_ROW, dtype=torch.int64, device=device)

    def merge(self, latent: Tensor, keys: Tensor, values: Tensor, rows: Tensor) -> None:
        """Fold in entries `[E]` (latent index, key, value, row key)."""
        count = self.keys.shape[1]
        better = keys > self.keys[latent, count - 1]  # only these can enter a latent's best
        if not better.any():
            return
        latent, keys, values, rows = latent[better], keys[better], values[better], rows[better]
        order = torch.argsort(keys, descending=True, stable=True)  # by key, then (stably) by latent
        order = order[torch.argsort(latent[order], stable=True)]
        latent, keys, values, rows = latent[order], keys[order], values[order], rows[order]
        rank = torch.arange(len(latent), device=latent.device) - torch.searchsorted(latent, latent)
        keep = rank < count  # at most `count` new entries per latent can enter
        latent, rank, keys, values, rows = latent[keep], rank[keep], keys[keep], values[keep], rows[keep]
        touched, slot = torch.unique_consecutive(latent, return_inverse=True)  # [m], ascending
        merged = []
        for store, new, empty in ((self.keys, keys, EMPTY), (self.values, values, 0), (self.rows, rows, NO_ROW)):
            candidates = torch.full((len(touched), count), empty, dtype=store.dtype, device=store.device)  # [m, count]
            candidates[slot, rank] = new
            merged.append(torch.cat([store[touched], candidates], dim=1))  # [m, 2 count]
        best, picked = merged[0].topk(count, dim=1)
        self.keys[touched] = best
        self.values[touched] = merged[1].gather(1, picked)
        self.rows[touched] = merged[2].gather(1, picked)


class LatentStats:
    """Running statistics of one dictionary's latents over batches of rows, on one device."""

    def __init__(self, n_latents: int, top: int, samples: int, device: torch.device | str, seed: int = 0):
        self.n_latents, self.samples = n_latents, samples
        self.rows = 0
        self.fire_count = torch.zeros(n_latents, dtype=torch.int64, device=device)  # [n_latents]
        self.act_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)  # [n_latents]
        self.hist = torch.zeros(n_latents * HIST_BINS, dtype=torch.int64, device=device)  # [n_latents * bins]
        self.top = Best(n_latents, top, device)
        # a uniform sample of firing rows: each (row, latent) gets a random priority, the highest are kept
        self.sample = Best(n_latents, max(samples, 1), device)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def add(self, acts: Tensor, row_keys: Tensor) -> None:
        """Fold in latent activations `[B, n_latents]` (float32) of rows identified by `row_keys` `[B]`."""
        self.rows += acts.shape[0]
        row_index, latent = (acts > 0).nonzero(as_tuple=True)  # [E] each: the firing entries
        values = acts[row_index, latent]  # [E]
        rows = row_keys[row_index]
        self.fire_count += torch.bincount(latent, minlength=self.n_latents)
        self.act_sum.index_add_(0, latent, values.double())
        bins = ((values.log10() - HIST_LOG10_LOW) * HIST_BINS_PER_DECADE).floor().clamp(0, HIST_BINS - 1)
        self.hist.index_add_(0, latent * HIST_BINS + bins.long(), torch.ones_like(latent))
        self.top.merge(latent, values, values, rows)
        if self.samples:
            priority = torch.rand(values.shape, generator=self.generator, device=values.device)  # [E]
            self.sample.merge(latent, priority, values, rows)

    def summary(self) -> Summary:
        """The statistics so far, on the CPU, one row per latent."""

        def cpu(tensor: Tensor) -> np.ndarray:
            return tensor.cpu().numpy()

        samples = slice(0, self.samples)
        return Summary(
            rows=self.rows,
            fire_count=cpu(self.fire_count),
            act_sum=cpu(self.act_sum),
            act_max=cpu(self.top.values[:, 0]),
            hist=cpu(self.hist.view(self.n_latents, HIST_BINS)),
            top_values=cpu(self.top.values),
            top_rows=cpu(self.top.rows),
            sample_values=cpu(self.sample.values[:, samples]),
            sample_rows=cpu(self.sample.rows[:, samples]),
        )
