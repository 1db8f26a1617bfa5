"""Pareto selection per dictionary size."""

from dictsweep.sweep.select import pareto_front, select


def test_pareto_front():
    scores = {"a": (5.0, 0.10), "b": (10.0, 0.05), "c": (10.0, 0.20), "d": (3.0, 0.30), "e": (5.0, 0.10)}
    # c is beaten by b (same l0, lower fvu); a and e tie and both stay
    assert pareto_front(scores) == {"a", "b", "d", "e"}


def test_select_is_per_size():
    results = {
        "small-sparse": {"n_latents": 64, "metrics": {"l0": 2.0, "fvu": 0.5}},
        "small-dense": {"n_latents": 64, "metrics": {"l0": 9.0, "fvu": 0.6}},  # dominated
        "big": {"n_latents": 128, "metrics": {"l0": 9.0, "fvu": 0.6}},  # alone in its size: selected
    }
    assert select(results) == {"small-sparse", "big"}
    assert select({}) == set()
