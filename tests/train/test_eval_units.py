"""Training curves in the eval metrics' units."""

import pytest
import torch

from dictsweep.sae import Member, build_ensemble
from dictsweep.train.evaluate import Evaluator, in_eval_units


def test_training_losses_in_eval_units_match_the_evaluator():
    """The logged training mse of a batch equals the Evaluator's eval mse on that same batch."""
    ensemble = build_ensemble("relu", 8, 16, [Member(lr=1e-3, seed=0, l1_coef=1.0)])
    ensemble.input_scale.fill_(7.0)
    raw = torch.randn(256, 8) * 0.3 + 0.1  # [B, d_model] raw activations
    with torch.no_grad():
        out = ensemble(raw * 7.0)
    evaluator = Evaluator(ensemble)
    evaluator.add(raw * 7.0)
    training = {"mse": float(out.mse[0]), "loss": float(out.loss[0]), "fvu": float(out.fvu[0]), "l0": 3.0}
    converted = in_eval_units(training, 8, 7.0)
    assert converted["mse"] == pytest.approx(evaluator.results()[0]["mse"], rel=1e-5)
    assert converted["loss"] == pytest.approx(training["loss"] / (8 * 49))
    assert (converted["fvu"], converted["l0"]) == (training["fvu"], 3.0)
