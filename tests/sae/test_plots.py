"""End-of-training plots come back as PNG images with the numbers they show."""

import io

import pytest
import torch
from matplotlib.image import imread

from dictsweep.sae.plots import decoder_norm_stats, member_figure, member_plot


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


@pytest.mark.parametrize("spread", [0.0, 1e-5, 0.3])
def test_decoder_norm_tick_labels_do_not_overlap(spread):
    """Unit-norm dictionaries (all norms 1), nearly unit-norm, and spread norms: readable x labels."""
    directions = torch.nn.functional.normalize(torch.randn(256, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    decoder = directions * (1 + spread * torch.rand(256, 1, generator=torch.Generator().manual_seed(4)))
    figure = member_figure(torch.full((256,), -2.0), decoder)
    figure.canvas.draw()
    norm_axes = figure.axes[1]
    low, high = norm_axes.get_xlim()
    if spread == 0.0:
        assert (low, high) == pytest.approx((0.95 - 0.005, 1.05 + 0.005), abs=0.01)  # 5% pad, hist margins
    labels = [
        label for label in norm_axes.get_xticklabels() if label.get_text() and low <= label.get_position()[0] <= high
    ]
    assert 3 <= len(labels) <= 6
    assert all(len(label.get_text()) <= 5 for label in labels), [label.get_text() for label in labels]
    assert norm_axes.xaxis.get_offset_text().get_text() == ""
    boxes = sorted((label.get_window_extent() for label in labels), key=lambda box: box.x0)
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:])), "tick labels overlap"
