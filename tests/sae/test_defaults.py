"""Defaults that work untuned: with only the grid set (sizes, k or L0 targets; every training
setting and the learning rate left at their defaults), the best dictionary at or above the
ground-truth feature count recovers the features (mean max cosine >= 0.95) within 1M tokens.

The shapes are seeded draws at the small end of the range the defaults are measured on (d_model
32-256, features 1-4x d_model, decay 0.99-1, 3-10 active); larger ones: README, "Defaults".
"""

import numpy as np
import pytest

from dictsweep.config import GridConfig, SweepSpec, TrainConfig
from dictsweep.sae import build_ensemble
from dictsweep.sae.metrics import mmcs_ground_truth
from dictsweep.store.synth import SynthConfig, build_model, sample_rows
from dictsweep.sweep.plan import grid_points
from dictsweep.train.loop import EnsembleTrainer

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
    active = int(synth.active)
    sparsity = {"k": [active, 2 * active]} if architecture == "topk" else {"target_l0": [active, 2 * active]}
    spec = SweepSpec(
        name="defaults",
        data={"uri": "unused"},
        grid=GridConfig(architecture=[architecture], n_latents=[synth.n_features], **sparsity),
    )
    points = grid_points(spec)
    assert len({point.lr for point in points}) == 1  # one width: one default learning rate
    ensemble = build_ensemble(architecture, synth.d_model, synth.n_features, [p.member() for p in points])
    ensemble.input_scale.fill_(float((synth.d_model / acts[:65536].pow(2).sum(-1).mean()).sqrt()))
    config = TrainConfig(tokens=TOKENS)  # the batch too is the default: 256 rows for 1M tokens
    rows = config.batch_rows
    trainer = EnsembleTrainer(ensemble, config, TOKENS // rows)
    for step in range(TOKENS // rows):
        trainer.step(acts[step * rows : (step + 1) * rows])
    recovered = [mmcs_ground_truth(ensemble.W_dec[i], model.features)["mmcs_ground_truth"] for i in range(len(points))]
    assert max(recovered) >= 0.95, dict(zip([p.name for p in points], recovered))
