"""Selection per dictionary size: the L0 band, the quality bounds, best or front, and the reasons."""

import pytest

from dictsweep.config import SelectConfig, SweepSpec
from dictsweep.sweep.select import pareto_front, select, selected_names


def sae(n_latents, l0, fvu, dead=0.0, **extra):
    return {"n_latents": n_latents, "metrics": {"l0": l0, "fvu": fvu, "dead_fraction": dead, **extra}}


def test_pareto_front():
    scores = {"a": (5.0, 0.10), "b": (10.0, 0.05), "c": (10.0, 0.20), "d": (3.0, 0.30), "e": (5.0, 0.10)}
    # c is beaten by b (same l0, lower fvu); a and e tie and both stay
    assert pareto_front(scores) == {"a", "b", "d", "e"}


def test_best_per_size_inside_the_band_with_reasons():
    results = {
        "a": sae(512, 20.0, 0.031),
        "b": sae(512, 10.0, 0.050),
        "dense": sae(512, 310.0, 0.001),  # best fvu of all, but L0 far above the band
        "bad": sae(512, 12.0, 1.11),
        "dead": sae(512, 15.0, 0.02, dead=0.7),  # better than a, but mostly dead
        "big": sae(1024, 40.0, 0.2),
        "too-sparse": sae(1024, 0.4, 0.9),
    }
    choices = select(results, SelectConfig(l0=(8, 128), max_fvu=1.0), d_model=384)
    assert selected_names(choices) == {"a", "big"}
    assert choices["a"].why == "best fvu 0.031 of n=512 inside L0 [8, 128] (2 eligible)"
    assert choices["b"].why == "fvu 0.05: n=512's best inside L0 [8, 128] is 0.031 (a)"
    assert choices["dense"].why == "L0 310 above band 128"
    assert choices["bad"].why == "fvu 1.11 >= max_fvu 1"
    assert choices["dead"].why == "dead 0.7 > max_dead_fraction 0.5"
    assert choices["big"].why == "best fvu 0.2 of n=1024 inside L0 [8, 128] (the only one eligible)"
    assert {name for name, choice in choices.items() if not choice.eligible} == {"dense", "bad", "dead", "too-sparse"}
    assert choices["too-sparse"].why == "L0 0.4 below band 8"


def test_default_band_follows_d_model_and_rejects_degenerate_dictionaries():
    config = SelectConfig()
    assert config.l0_band(384) == (1.0, 128.0)
    results = {
        "wide": sae(3072, 1045.0, 0.01),  # L0 above d_model / 2
        "mean": sae(768, 30.0, 1.114),  # worse than predicting the mean
        "dead": sae(768, 30.0, 0.2, dead=0.9),
        "fine": sae(768, 60.0, 0.3),
    }
    choices = select(results, config, d_model=384)
    assert selected_names(choices) == {"fine"}
    assert choices["wide"].why == "L0 1045 above band 128"
    # the same L0 on a 64-wide model is outside the default band [1, 21.3]
    assert selected_names(select({"x": sae(768, 30.0, 0.2)}, config, d_model=64)) == set()


def test_front_keeps_the_pareto_points_inside_the_band():
    results = {
        "sparse": sae(256, 10.0, 0.30),
        "mid": sae(256, 20.0, 0.20),
        "worse": sae(256, 25.0, 0.25),  # beaten by mid on both
        "dense": sae(256, 200.0, 0.01),  # would be on the front, but outside the band
    }
    choices = select(results, SelectConfig(l0=(1, 64), per_size="front"), d_model=256)
    assert selected_names(choices) == {"sparse", "mid"}
    assert choices["worse"].why == "beaten by mid (L0 20, fvu 0.2) on n=256's front"
    assert choices["mid"].why == "on n=256's (L0, fvu) front inside L0 [1, 64]"


def test_loss_recovered_ranks_higher_first_and_is_required():
    results = {
        "low-fvu": sae(128, 10.0, 0.10, loss_recovered=0.80),
        "high-recovered": sae(128, 10.0, 0.20, loss_recovered=0.95),
        "unspliced": sae(128, 10.0, 0.05),
    }
    choices = select(results, SelectConfig(l0=(1, 64), metric="loss_recovered"), d_model=128)
    assert selected_names(choices) == {"high-recovered"}
    assert choices["unspliced"].why == "no loss_recovered measured"
    assert choices["low-fvu"].why.startswith("loss_recovered 0.8: n=128's best")
    by_fvu = select(results, SelectConfig(l0=(1, 64)), d_model=128)
    assert selected_names(by_fvu) == {"unspliced"}


def test_select_spec_section_is_checked():
    base = {"name": "s", "data": {"uri": "d"}, "grid": {"n_latents": [8]}}
    assert SweepSpec.model_validate({**base, "select": {"l0": [4, 64]}}).select.l0 == [4, 64]
    with pytest.raises(ValueError, match="low <= high"):
        SweepSpec.model_validate({**base, "select": {"l0": [64, 4]}})
    with pytest.raises(ValueError, match="per_size"):
        SweepSpec.model_validate({**base, "select": {"per_size": "all"}})
    with pytest.raises(ValueError, match="needs every SAE spliced"):
        SweepSpec.model_validate(
            {**base, "select": {"metric": "loss_recovered"}, "evaluation": {"splice_selected_only": True}}
        )
