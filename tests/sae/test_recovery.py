"""On the toy model of superposition, SAEs recover the ground-truth features."""

import numpy as np
import pytest
import torch

from dictsweep.config import TrainConfig
from dictsweep.sae import Member, build_ensemble
from dictsweep.sae.metrics import mmcs_ground_truth
from dictsweep.store.synth import SynthConfig, build_model, sample_rows
from dictsweep.train.loop import EnsembleTrainer

ROWS, BATCH = 150_000, 256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    config = SynthConfig(d_model=32, n_features=64, active=3, decay=0.99, rows=ROWS, seed=0)
    model = build_model(config)
    acts, _ = sample_rows(model, config, ROWS, np.random.default_rng(0))
    return acts, model.features


@pytest.mark.parametrize(
    "architecture,n_latents,member",
    [
        ("relu", 128, Member(lr=3e-3, seed=0, l1_coef=2.0)),
        ("topk", 64, Member(lr=3e-3, seed=0, k=4)),
        ("topk", 128, Member(lr=3e-3, seed=0, k=3)),
        ("batchtopk", 128, Member(lr=3e-3, seed=0, k=3)),
        ("jumprelu", 128, Member(lr=3e-3, seed=0, l1_coef=2.0)),
    ],
)
def test_recovers_ground_truth(toy, architecture, n_latents, member):
    acts, features = toy
    ensemble = build_ensemble(architecture, 32, n_latents, [member])
    ensemble.input_scale.fill_(float((32 / acts.pow(2).sum(-1).mean()).sqrt()))
    steps = ROWS // BATCH
    trainer = EnsembleTrainer(ensemble, TrainConfig(tokens=ROWS, batch_rows=BATCH, lr_warmup_steps=20), steps)
    before = mmcs_ground_truth(ensemble.W_dec[0], features)["mmcs_ground_truth"]
    for step in range(steps):
        trainer.step(acts[step * BATCH : (step + 1) * BATCH])
    recovery = mmcs_ground_truth(ensemble.W_dec[0], features)
    assert before < 0.6  # random directions in 32 dimensions are far from the features
    assert recovery["mmcs_ground_truth"] >= 0.9, recovery
    with torch.no_grad():
        out = ensemble(acts[:4096] * ensemble.input_scale)
    assert float(out.fvu[0]) < 0.25 and float(out.l0[0]) < 8
