"""End-of-training plots come back as PNG images with the numbers they show."""

import io

import pytest
import torch
from matplotlib.image import imread

from dictsweep.sae.plots import decoder_norm_stats, member_plot


def test_decoder_norm_stats():
    decoder = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])  # norms 5, 1, 2
    stats = decoder_norm_stats(decoder)
    assert stats["decoder_norm_mean"] == pytest.approx(8 / 3)
    assert stats["decoder_norm_min"] == 1.0 and stats["decoder_norm_max"] == 5.0
    assert stats["decoder_norm_std"] == pytest.approx(float(torch.tensor([5.0, 1.0, 2.0]).std(correction=0)))


def test_member_plot_is_a_png():
    log10_frequency = torch.cat([torch.linspace(-4, -1, 90), torch.full((10,), -10.0)])  # 10 never fired
    decoder = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    png = member_plot(log10_frequency, decoder, title="relu n=100")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(io.BytesIO(png), format="png")
    assert image.shape[:2] == (400, 1000)
    assert image[..., :3].std() > 0.05  # something is drawn


def test_member_plot_of_a_unit_norm_decoder_that_never_fired():
    decoder = torch.nn.functional.normalize(torch.randn(64, 8), dim=-1)  # every norm 1 (the top-k family)
    png = member_plot(torch.full((64,), -10.0), decoder)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
