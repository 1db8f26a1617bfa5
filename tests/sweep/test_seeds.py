"""Seeds: Student's t intervals, grouping a grid's seeds, selection by the seed mean, feature stability
between seeds' decoders, and the Pareto plot's points at the means."""

import math

import pytest
import torch

from dictsweep.config import SelectConfig
from dictsweep.sweep.plan import GridPoint
from dictsweep.sweep.seeds import interval, seed_groups, select_over_seeds, stability, t_quantile


def test_t_quantile_is_students():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 40)) + [60, 120, 1000]:
        assert t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=2e-4)


def test_interval_of_three_seeds():
    got = interval([0.10, 0.12, 0.14])
    half = 4.30265 * 0.02 / math.sqrt(3)  # t(0.975, 2) x sample std / sqrt(n)
    assert got["mean"] == pytest.approx(0.12) and got["half_width"] == pytest.approx(half)
    assert (got["low"], got["high"], got["n"]) == (pytest.approx(0.12 - half), pytest.approx(0.12 + half), 3)
    assert math.isnan(interval([0.3])["half_width"])  # one seed: no interval


def points(k: int, seeds) -> dict:
    return {p.name: p for p in (GridPoint("topk", 64, 0.001, seed, k=k) for seed in seeds)}


def test_selection_ranks_grid_points_by_their_seed_mean():
    """k=8's best single seed beats every k=16 seed, but its mean does not: k=16 is chosen, with all its seeds."""
    grid = points(8, [0, 1, 2]) | points(16, [0, 1, 2])
    groups = seed_groups(grid)
    assert groups == {
        "topk-n64-k8-lr0.001": ["topk-n64-k8-lr0.001-s0", "topk-n64-k8-lr0.001-s1", "topk-n64-k8-lr0.001-s2"],
        "topk-n64-k16-lr0.001": ["topk-n64-k16-lr0.001-s0", "topk-n64-k16-lr0.001-s1", "topk-n64-k16-lr0.001-s2"],
    }
    fvu = {"k8-lr0.001-s0": 0.10, "k8-lr0.001-s1": 0.30, "k8-lr0.001-s2": 0.32}
    fvu |= {"k16-lr0.001-s0": 0.20, "k16-lr0.001-s1": 0.21, "k16-lr0.001-s2": 0.22}
    results = {
        name: {
            "n_latents": 64,
            "metrics": {"l0": float(point.k), "fvu": fvu[name[len("topk-n64-") :]], "dead_fraction": 0.0},
        }
        for name, point in grid.items()
    }
    choices = select_over_seeds(results, groups, SelectConfig(l0=[1, 20]), d_model=32)
    assert {name for name, c in choices.items() if c.selected} == set(groups["topk-n64-k16-lr0.001"])
    assert (
        choices["topk-n64-k16-lr0.001-s1"].why
        == "best fvu 0.21 of n=64 inside L0 [1, 20] (2 eligible) (mean of 3 seeds)"
    )
    assert "0.24" in choices["topk-n64-k8-lr0.001-s0"].why  # its mean, not its own 0.10


def test_one_seed_per_point_selects_as_before():
    from dictsweep.sweep.select import select

    grid = points(8, [0]) | points(16, [0])
    results = {
        name: {"n_latents": 64, "metrics": {"l0": float(p.k), "fvu": 0.1 * p.k, "dead_fraction": 0.0}}
        for name, p in grid.items()
    }
    config = SelectConfig(l0=[1, 20])
    assert select_over_seeds(results, seed_groups(grid), config, 32) == select(results, config, 32)


def test_feature_stability_between_seeds():
    generator = torch.Generator().manual_seed(0)
    decoder = torch.randn(32, 16, generator=generator)
    shuffled = decoder[torch.randperm(32, generator=generator)] * 3.0  # same directions, order and norm differ
    assert stability([decoder, shuffled]) == pytest.approx(1.0)
    other = torch.randn(32, 16, generator=generator)
    assert 0.2 < stability([decoder, other]) < 0.8  # random directions in 16 dimensions
    assert stability([decoder, shuffled, other]) == pytest.approx((1.0 + 2 * stability([decoder, other])) / 3)
    assert math.isnan(stability([decoder]))


def test_pareto_plot_draws_each_points_interval():
    from matplotlib.container import ErrorbarContainer

    from dictsweep.sweep.report import pareto_figure

    saes = [
        {
            "architecture": "topk",
            "n_latents": 64,
            "l0": 8.0,
            "fvu": 0.30,
            "l0_ci95": 0.5,
            "fvu_ci95": 0.02,
            "selected": False,
        },
        {
            "architecture": "topk",
            "n_latents": 64,
            "l0": 16.0,
            "fvu": 0.20,
            "l0_ci95": float("nan"),
            "fvu_ci95": 0.01,
            "selected": True,
        },
    ]
    axes = pareto_figure(saes, []).axes[0]
    segments = [
        segment
        for container in axes.containers
        if isinstance(container, ErrorbarContainer)
        for collection in container.lines[2]
        for segment in collection.get_segments()
    ]
    vertical = sorted((float(s[0][1]), float(s[1][1])) for s in segments if s[0][0] == s[1][0] and s[0][1] != s[1][1])
    assert vertical == [pytest.approx((0.19, 0.21)), pytest.approx((0.28, 0.32))]  # fvu +- its half width
    assert "seed mean, 95% t-interval" in [text.get_text() for text in axes.get_legend().get_texts()]
