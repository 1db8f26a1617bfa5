"""The metrics give the numbers their definitions say."""

import pytest
import torch

from dictsweep.sae.metrics import (
    FiringTracker,
    fvu,
    fvu_from_moments,
    l0_from_counts,
    mmcs,
    mmcs_ground_truth,
    mse,
    squared_error,
)


def test_mse_fvu_l0_on_known_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
    assert float(squared_error(x, x_hat)) == pytest.approx(1.0)  # summed over d_model, averaged over rows
    assert float(mse(squared_error(x, x_hat), 2)) == pytest.approx(0.5)
    # on the training scale (x * 3) the error is 9 times larger; per element of raw x it is the same
    assert float(mse(squared_error(3 * x, 3 * x_hat), 2, input_scale=3.0)) == pytest.approx(0.5)
    # total variance about the mean (2, 3): 4 * 1 = 4; residual 2
    assert float(fvu(x, x_hat)) == pytest.approx(0.5)
    assert float(fvu(x, x)) == 0.0
    assert float(fvu(x, x.mean(0, keepdim=True).expand_as(x))) == pytest.approx(1.0)
    assert float(fvu_from_moments(squared_error(x, x_hat), x.sum(0), x.pow(2).sum(), 2)) == pytest.approx(0.5)
    fires = (torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]) != 0).float().sum(0)  # rows each latent fired on
    assert float(l0_from_counts(fires, 2)) == pytest.approx(1.5)


def test_stacked_metrics_are_per_member():
    x = torch.randn(2, 10, 4)
    assert squared_error(x, torch.zeros_like(x)).shape == (2,)
    assert fvu(x, torch.zeros_like(x)).shape == (2,)
    assert l0_from_counts(torch.ones(2, 5), 10).shape == (2,)


def test_mmcs_both_directions():
    truth = torch.eye(4)
    learned = torch.cat([torch.eye(4)[:2], torch.tensor([[1.0, 1.0, 0, 0]])])  # 2 exact, 1 between
    over_learned, over_truth = mmcs(learned, truth)
    assert over_learned == pytest.approx((1 + 1 + 2**-0.5) / 3)
    assert over_truth == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert mmcs_ground_truth(learned, truth) == {"mmcs_ground_truth": over_truth, "mmcs_learned": over_learned}
    # scale does not matter, sign does
    assert mmcs(3 * truth, truth)[0] == pytest.approx(1.0)
    assert mmcs(-truth, truth)[0] == pytest.approx(0.0)


def test_firing_tracker_dead_and_dense():
    tracker = FiringTracker(n_members=1, n_latents=3, window_tokens=100, dense_threshold=0.5)
    # latent 0 fires on every row, latent 1 once early, latent 2 never
    tracker.update(torch.tensor([[50.0, 1.0, 0.0]]), 50)
    assert float(tracker.dead_fraction()) == 0.0  # no full window yet
    for _ in range(3):
        tracker.update(torch.tensor([[50.0, 0.0, 0.0]]), 50)
    assert tracker.dead_mask().tolist() == [[False, True, True]]
    assert float(tracker.dead_fraction()) == pytest.approx(2 / 3)
    assert float(tracker.dense_fraction()) == pytest.approx(1 / 3)
    frequency = 10 ** tracker.log10_frequency()
    assert frequency[0].tolist() == pytest.approx([1.0, 1 / 200, 1e-10], rel=1e-5)
