"""LatentStats over batches equals the same statistics computed on all rows at once."""

import numpy as np
import torch

from dictsweep.analysis.stats import HIST_BINS, NO_ROW, LatentStats, hist_edges


def sparse_acts(rows: int, n_latents: int, seed: int) -> torch.Tensor:
    """Non-negative activations [rows, n_latents], ~20% firing, spread over several decades."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(rows, n_latents, generator=generator) * 4 - 2)
    return magnitude * (torch.rand(rows, n_latents, generator=generator) < 0.2)


def test_batched_statistics_equal_whole_matrix_ones():
    acts = sparse_acts(500, 12, seed=0)  # [500, 12]
    acts[:, 5] = 0  # a latent that never fires
    acts[:3, 7] = 0.5  # three rows with one value: ties must not break the count
    keys = torch.arange(1000, 1500)  # row keys need not be row indices
    stats = LatentStats(12, top=7, samples=9, device="cpu", seed=0)
    for start in range(0, 500, 64):  # uneven last batch
        stats.add(acts[start : start + 64], keys[start : start + 64])
    summary = stats.summary()
    firing = acts > 0
    assert summary.rows == 500
    assert np.array_equal(summary.fire_count, firing.sum(0).numpy())
    assert np.allclose(summary.act_sum, acts.double().sum(0).numpy())
    assert np.array_equal(summary.act_max, acts.max(0).values.numpy())
    edges = np.array(hist_edges())
    for latent in range(12):
        values = acts[:, latent][firing[:, latent]].numpy()
        expected = np.histogram(np.clip(values, edges[0], edges[-1] * 0.999), bins=edges)[0]
        assert np.array_equal(summary.hist[latent], expected), latent
        order = torch.argsort(acts[:, latent], descending=True, stable=True)[:7]
        top = acts[order, latent].numpy()
        fired = top > 0
        assert np.array_equal(summary.top_values[latent][fired], top[fired])
        top_rows = summary.top_rows[latent][fired] - 1000
        assert np.array_equal(acts[top_rows, latent].numpy(), top[fired])  # each row holds its value
        assert len(set(top_rows.tolist())) == len(top_rows)
        assert (summary.top_rows[latent][~fired] == NO_ROW).all()
        # samples: distinct firing rows with their own values, as many as fired (up to 9)
        sampled = summary.sample_rows[latent] != NO_ROW
        assert sampled.sum() == min(9, int(firing[:, latent].sum()))
        rows = summary.sample_rows[latent][sampled] - 1000
        assert len(set(rows.tolist())) == len(rows)
        assert np.array_equal(summary.sample_values[latent][sampled], acts[rows, latent].numpy())
    assert summary.hist.shape == (12, HIST_BINS)
    assert summary.fire_count[5] == 0 and (summary.top_rows[5] == NO_ROW).all()


def test_samples_are_uniform_over_firing_rows():
    """Each of 40 firing rows is kept in a sample of 10 a quarter of the time."""
    acts = torch.zeros(40, 1)
    acts[:, 0] = torch.linspace(1, 2, 40)  # [40, 1]
    kept = np.zeros(40)
    for seed in range(200):
        stats = LatentStats(1, top=1, samples=10, device="cpu", seed=seed)
        for start in range(0, 40, 8):
            stats.add(acts[start : start + 8], torch.arange(start, start + 8))
        kept[stats.summary().sample_rows[0]] += 1
    assert abs(kept.mean() / 200 - 0.25) < 1e-9
    assert kept.min() > 25 and kept.max() < 75  # binomial(200, 0.25): mean 50, sd 6.1
