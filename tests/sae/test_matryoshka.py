"""matryoshka_batchtopk: an ensemble trains as its members alone, its loss is SAELens', it recovers the
toy model's features, SAELens loads its export with the same outputs, and a resumed trainer continues
exactly."""

import numpy as np
import pytest
import sae_lens
import torch
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput

from dictsweep.config import TrainConfig
from dictsweep.errors import InputError
from dictsweep.sae import Member, build_ensemble
from dictsweep.sae.export import member_files
from dictsweep.sae.matryoshka import MATRYOSHKA_PREFIXES, prefix_widths
from dictsweep.sae.metrics import mmcs_ground_truth
from dictsweep.store.synth import SynthConfig, build_model, sample_rows
from dictsweep.train.loop import EnsembleTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL, N_LATENTS, BATCH, STEPS = 16, 48, 64, 20
# different k, different prefixes and different numbers of prefixes in one stack
MEMBERS = [
    Member(lr=1e-3, seed=1, k=4, matryoshka_prefixes=(0.25, 0.5)),
    Member(lr=3e-3, seed=2, k=8, matryoshka_prefixes=(0.125,)),
    Member(lr=2e-3, seed=3, k=2, matryoshka_prefixes=(0.0625, 0.25, 0.75)),
]
CONFIG = TrainConfig(
    tokens=BATCH * STEPS, batch_rows=BATCH, lr_warmup_steps=5, grad_clip=0.5, dead_window_tokens=BATCH * 2
)


def batches(count=STEPS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(32, D_MODEL, generator=generator)
    codes = [
        torch.rand(BATCH, 32, generator=generator) * (torch.rand(BATCH, 32, generator=generator) < 0.1)
        for _ in range(count)
    ]
    return [code @ basis for code in codes]


def trained(members, steps=STEPS, kernel="bmm", decode="dense"):
    ensemble = build_ensemble("matryoshka_batchtopk", D_MODEL, N_LATENTS, members, kernel=kernel, decode=decode)
    ensemble.input_scale.fill_(1.3)
    trainer = EnsembleTrainer(ensemble, CONFIG, total_batches=STEPS)
    for batch in batches()[:steps]:
        trainer.step(batch)
    return trainer


@pytest.mark.parametrize("kernel,decode", [("bmm", "dense"), ("loop", "dense"), ("bmm", "sparse")])
def test_ensemble_equals_independent_members(kernel, decode):
    stacked = trained(MEMBERS, kernel=kernel, decode=decode)
    assert max(stacked.log_metrics()["aux_loss"]) > 0  # latents died and the matryoshka AuxK trained them
    for index, member in enumerate(MEMBERS):
        alone = trained([member], kernel=kernel, decode=decode)
        for name, param in stacked.ensemble.named_parameters():
            torch.testing.assert_close(param[index], getattr(alone.ensemble, name)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stacked.ensemble.threshold[index], alone.ensemble.threshold[0])
        assert not torch.allclose(alone.ensemble.W_dec[0], alone.ensemble.init_member(member.seed)[1], atol=1e-3)


def test_loss_is_saelens_matryoshka_loss():
    """Our loss (without AuxK) is SAELens' MatryoshkaBatchTopKTrainingSAE loss on the same weights and
    batch: the whole dictionary's squared error plus each inner prefix's."""
    ensemble = trained(MEMBERS, steps=6).ensemble
    x = batches(seed=4)[0] * ensemble.input_scale
    out = ensemble(x)
    for index, member in enumerate(MEMBERS):
        widths = prefix_widths(member.matryoshka_prefixes, N_LATENTS)
        config = MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D_MODEL, d_sae=N_LATENTS, k=member.k, matryoshka_widths=widths, rescale_acts_by_decoder_norm=False
        )
        sae = MatryoshkaBatchTopKTrainingSAE(config)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(ensemble, name)[index])
        step = TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
        )
        theirs = sae.training_forward_pass(step)
        assert len([name for name in theirs.losses if name.startswith("inner_mse_loss")]) == len(widths) - 1
        assert float(out.loss[index].detach()) == pytest.approx(float(theirs.loss.detach()), rel=1e-5)
        assert float(out.mse[index].detach()) == pytest.approx(float(theirs.losses["mse_loss"]), rel=1e-5)


def test_prefixes_are_checked_against_the_width():
    assert MATRYOSHKA_PREFIXES.problem([0.25, 0.5], 64) is None
    assert "increase" in MATRYOSHKA_PREFIXES.problem([0.5, 0.25], 64)
    assert "fractions in (0, 1)" in MATRYOSHKA_PREFIXES.problem([0.25, 1.0], 64)
    assert "at least one latent" in MATRYOSHKA_PREFIXES.problem([0.001], 64)
    assert MATRYOSHKA_PREFIXES.name_part((0.0625, 0.25)) == "m0.0625_0.25"
    assert MATRYOSHKA_PREFIXES.parse("(0.0625, 0.25)") == (0.0625, 0.25)  # as MLflow keeps the param
    assert MATRYOSHKA_PREFIXES.parse("None") is None


def test_grid_prefixes_that_do_not_fit_are_an_input_error():
    from dictsweep.config import SweepSpec
    from dictsweep.sweep.plan import grid_points

    grid = {
        "architecture": ["matryoshka_batchtopk"],
        "n_latents": [64, 16],
        "k": [4],
        "matryoshka_prefixes": [[0.25, 0.5], 0.03],
    }
    spec = SweepSpec.model_validate({"name": "m", "data": {"uri": "/nowhere"}, "grid": grid})
    with pytest.raises(InputError, match="grid.matryoshka_prefixes"):
        grid_points(spec)
    spec.grid.matryoshka_prefixes = [[0.25, 0.5], 0.125]
    names = [point.name for point in grid_points(spec)]
    assert "matryoshka_batchtopk-n64-k4-m0.25_0.5-lr0.0096-s0" in names and len(names) == 4


def test_recovers_ground_truth():
    rows, batch = 150_000, 256
    config = SynthConfig(d_model=32, n_features=64, active=3, decay=0.99, rows=rows, seed=0)
    model = build_model(config)
    acts, _ = sample_rows(model, config, rows, np.random.default_rng(0))
    ensemble = build_ensemble(
        "matryoshka_batchtopk", 32, 128, [Member(lr=3e-3, seed=0, k=3, matryoshka_prefixes=(0.25,))]
    )
    ensemble.input_scale.fill_(float((32 / acts.pow(2).sum(-1).mean()).sqrt()))
    trainer = EnsembleTrainer(ensemble, TrainConfig(tokens=rows, batch_rows=batch, lr_warmup_steps=20), rows // batch)
    for step in range(rows // batch):
        trainer.step(acts[step * batch : (step + 1) * batch])
    recovery = mmcs_ground_truth(ensemble.W_dec[0], model.features)
    assert recovery["mmcs_ground_truth"] >= 0.9, recovery
    # the first prefix (32 latents) holds the most frequent features: its atoms are nearer the true features
    # that fire most than the rest of the dictionary's
    first = mmcs_ground_truth(ensemble.W_dec[0, :32], model.features[:16])["mmcs_ground_truth"]
    rest = mmcs_ground_truth(ensemble.W_dec[0, 32:], model.features[:16])["mmcs_ground_truth"]
    assert first > rest, (first, rest)


def test_saelens_loads_the_export_with_identical_outputs(tmp_path):
    trainer = trained(MEMBERS)
    ensemble = trainer.ensemble
    raw = batches(seed=7)[0]
    with torch.no_grad():
        ours = ensemble(raw * ensemble.input_scale).sae_out / ensemble.input_scale  # [K, B, d_model]
    for index in range(len(MEMBERS)):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        files = member_files(ensemble, index, trainer.firing.log10_frequency()[index], {"hook_name": "toy"})
        for name, data in files.items():
            (folder / name).write_bytes(data)
        sae = sae_lens.SAE.load_from_disk(str(folder))
        assert sae.cfg.architecture() == "jumprelu"
        with torch.no_grad():
            torch.testing.assert_close(sae(raw), ours[index], rtol=1e-4, atol=1e-5)


def test_resume_continues_exactly():
    whole = trained(MEMBERS, steps=STEPS)
    first = trained(MEMBERS, steps=12)  # AuxK is on by then
    resumed = EnsembleTrainer(
        build_ensemble("matryoshka_batchtopk", D_MODEL, N_LATENTS, MEMBERS, kernel="bmm", decode="dense"), CONFIG, STEPS
    )
    resumed.load_state_dict(first.state_dict())
    for batch in batches()[12:]:
        resumed.step(batch)
    for mine, theirs in zip(resumed.ensemble.parameters(), whole.ensemble.parameters()):
        assert torch.equal(mine, theirs)
    assert torch.equal(resumed.ensemble.threshold, whole.ensemble.threshold)
