"""Defaults that work untuned: with only the grid set (sizes, k or L0 targets; every training
setting and the learning rate left at their defaults), the best dictionary at or above the
ground-truth feature count recovers the features (mean max cosine >= 0.95) within 1M tokens.

The shapes are seeded draws at the small end of the range the defaults are measured on (d_model
32-256, features 1-4x d_model, decay 0.99-1, 3-10 active); larger ones: `dictsweep bench recovery`
and docs/measurements.md.
"""

import numpy as np
import pytest

from dictsweep.config import TrainConfig
from dictsweep.store.synth import SynthConfig, build_model, sample_rows
from dictsweep.sweep.recovery import train_synthetic

TOKENS = 1_048_576

SHAPES = {  # seeded draws: d_model, features per d_model, decay, active
    "d32": SynthConfig(d_model=32, n_features=96, decay=0.99, active=3, rows=TOKENS, seed=3),
    "d48": SynthConfig(d_model=48, n_features=96, decay=1.0, active=6, rows=TOKENS, seed=4),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("architecture", ["relu", "topk"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_default_training_recovers_the_ground_truth(shape, architecture):
    synth = SHAPES[shape]
    model = build_model(synth)
    acts, _ = sample_rows(model, synth, TOKENS, np.random.default_rng(synth.seed))
    sparsity = [synth.active, 2 * synth.active]
    config = TrainConfig(tokens=TOKENS)  # the batch too is the default: 256 rows for 1M tokens
    scores = train_synthetic(synth, acts, model.features, architecture, synth.n_features, sparsity, config)
    assert len({score["lr"] for score in scores}) == 1  # one width: one default learning rate
    recovered = {score["name"]: score["mmcs_ground_truth"] for score in scores}
    assert max(recovered.values()) >= 0.95, recovered
