"""Transcoders and skip transcoders: an ensemble trains as its members alone, they recover a synthetic
sparse map's target features, SAELens loads their export with the same outputs, and a resumed trainer
continues exactly."""

import numpy as np
import pytest
import sae_lens
import torch

from dictsweep.config import TrainConfig
from dictsweep.errors import InputError
from dictsweep.sae import ARCHITECTURES, Member, build_ensemble
from dictsweep.sae.export import member_files, read_dictionary
from dictsweep.sae.metrics import mmcs_ground_truth
from dictsweep.sae.transcoder import BASES
from dictsweep.store.synth import SynthConfig, build_model, sample_rows, sample_targets
from dictsweep.train.loop import EnsembleTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_OUT, N_LATENTS, BATCH, STEPS = 16, 12, 48, 64, 20
VARIANTS = [f"{base}_{skip}transcoder" for base in BASES for skip in ("", "skip_")]
SPARSITY = {
    "relu": [1.0, 30.0, 0.3],
    "jumprelu": [0.1, 0.3, 0.03],
    "batchtopk": [4, 8, 2],
    "matryoshka_batchtopk": [4, 8, 2],
}
SAELENS_NAMES = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}
CONFIG = TrainConfig(
    tokens=BATCH * STEPS,
    batch_rows=BATCH,
    lr_warmup_steps=5,
    grad_clip=0.5,
    dead_window_tokens=BATCH * 2,
    resample_every_tokens=BATCH * 5,
    resample_until_fraction=1.0,
)


def base_of(variant):
    return variant.removesuffix("_transcoder").removesuffix("_skip")


def members_of(variant):
    key = "k" if "topk" in variant else "l1_coef"
    values = SPARSITY[base_of(variant)]
    return [Member(lr=lr, seed=seed, **{key: value}) for lr, seed, value in zip([1e-3, 3e-3, 2e-3], [1, 2, 3], values)]


def batches(count=STEPS, seed=0):
    """Rows [B, d_in + d_out]: an input and its target, a sparse code through two bases, plus a dense
    linear part of the input (what a skip path learns)."""
    generator = torch.Generator().manual_seed(seed)
    basis_in, basis_out = torch.randn(32, D_IN, generator=generator), torch.randn(32, D_OUT, generator=generator)
    linear = torch.randn(D_IN, D_OUT, generator=generator) * 0.3
    out = []
    for _ in range(count):
        codes = torch.rand(BATCH, 32, generator=generator) * (torch.rand(BATCH, 32, generator=generator) < 0.1)
        x = codes @ basis_in
        out.append(torch.cat([x, 2.0 * (codes @ basis_out) + x @ linear], 1))
    return out


def trained(variant, members, steps=STEPS):
    ensemble = build_ensemble(variant, D_IN, N_LATENTS, members, d_out=D_OUT, kernel="bmm", decode="dense")
    ensemble.input_scale.fill_(1.7)
    ensemble.target_scale.fill_(0.6)
    trainer = EnsembleTrainer(ensemble, CONFIG, total_batches=STEPS)
    for batch in batches()[:steps]:
        trainer.step(batch)
    return trainer


def test_every_variant_is_registered_with_its_saelens_name():
    for variant in VARIANTS:
        cls = ARCHITECTURES[variant]
        saelens = SAELENS_NAMES[ARCHITECTURES[base_of(variant)].saelens_architecture]
        assert cls.saelens_architecture == (saelens.replace("transcoder", "skip_transcoder") if cls.skip else saelens)
    assert "topk_transcoder" not in ARCHITECTURES  # SAELens has no top-k transcoder to load it


@pytest.mark.parametrize("variant", VARIANTS)
def test_ensemble_equals_independent_members(variant):
    members = members_of(variant)
    stacked = trained(variant, members)
    assert tuple(stacked.ensemble.W_dec.shape) == (3, N_LATENTS, D_OUT) and tuple(stacked.ensemble.b_dec.shape) == (
        3,
        D_OUT,
    )
    metrics = stacked.log_metrics()
    if stacked.ensemble.dead_latents == "auxk":
        assert max(metrics["aux_loss"]) > 0
    if stacked.ensemble.dead_latents == "resample" and not stacked.ensemble.skip:  # (the skip path keeps all alive)
        assert max(metrics["resampled_latents"]) > 0
    for index, member in enumerate(members):
        alone = trained(variant, [member])
        for name, param in stacked.ensemble.named_parameters():
            torch.testing.assert_close(param[index], getattr(alone.ensemble, name)[0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(alone.ensemble.W_dec[0], alone.ensemble.init_member(member.seed)[1], atol=1e-3)
    if stacked.ensemble.skip:
        assert float(stacked.ensemble.W_skip.detach().abs().max()) > 1e-3  # the skip path trained


@pytest.mark.parametrize("variant", VARIANTS)
def test_saelens_loads_the_export_with_identical_outputs(tmp_path, variant):
    trainer = trained(variant, members_of(variant))
    ensemble = trainer.ensemble
    rows = batches(seed=7)[0]
    with torch.no_grad():
        ensemble.eval()  # inference: batchtopk's threshold
        ours = ensemble(rows * ensemble.input_scale).sae_out / ensemble.target_scale  # [K, B, d_out], raw units
    for index in range(ensemble.n_members):
        files = member_files(ensemble, index, trainer.firing.log10_frequency()[index], {"hook_name": "in"})
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        sae = sae_lens.SAE.load_from_disk(str(folder))
        assert sae.cfg.architecture() == ensemble.saelens_architecture and sae.cfg.d_out == D_OUT
        mine = read_dictionary(files.get, str(folder))
        with torch.no_grad():
            torch.testing.assert_close(sae(rows[:, :D_IN]), ours[index], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine(rows[:, :D_IN]), ours[index], rtol=1e-4, atol=1e-4)


def test_a_transcoder_folder_that_subtracts_b_dec_is_refused(tmp_path):
    trainer = trained("relu_transcoder", members_of("relu_transcoder")[:1], steps=2)
    files = member_files(trainer.ensemble, 0, trainer.firing.log10_frequency()[0], {})
    files["cfg.json"] = files["cfg.json"].replace(b'"apply_b_dec_to_input": false', b'"apply_b_dec_to_input": true')
    with pytest.raises(InputError, match="apply_b_dec_to_input"):
        read_dictionary(lambda name: files.get(name), "tc")


@pytest.mark.parametrize("variant", ["relu_skip_transcoder", "matryoshka_batchtopk_skip_transcoder"])
def test_resume_continues_exactly(variant):
    members = members_of(variant)
    whole, first = trained(variant, members), trained(variant, members, steps=12)
    resumed = EnsembleTrainer(
        build_ensemble(variant, D_IN, N_LATENTS, members, d_out=D_OUT, kernel="bmm", decode="dense"), CONFIG, STEPS
    )
    resumed.ensemble.input_scale.fill_(1.7)
    resumed.load_state_dict(first.state_dict())
    assert float(resumed.ensemble.target_scale) == pytest.approx(0.6)  # a buffer of the checkpoint
    for batch in batches()[12:]:
        resumed.step(batch)
    for mine, theirs in zip(resumed.ensemble.parameters(), whole.ensemble.parameters()):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("variant", ["batchtopk_transcoder", "relu_transcoder"])
def test_recovers_the_target_features_of_a_sparse_map(variant):
    rows, batch = 150_000, 256
    config = SynthConfig(d_model=32, d_target=24, n_features=64, active=3, decay=0.99, rows=rows, seed=0)
    model = build_model(config)
    acts, codes = sample_rows(model, config, rows, np.random.default_rng(0))
    targets = sample_targets(model, config, codes, np.random.default_rng(1))
    member = Member(lr=3e-3, seed=0, k=3, l1_coef=2.0)
    ensemble = build_ensemble(variant, 32, 128, [member], d_out=24)
    ensemble.input_scale.fill_(float((32 / acts.pow(2).sum(-1).mean()).sqrt()))
    ensemble.target_scale.fill_(float((24 / targets.pow(2).sum(-1).mean()).sqrt()))
    trainer = EnsembleTrainer(ensemble, TrainConfig(tokens=rows, batch_rows=batch, lr_warmup_steps=20), rows // batch)
    data = torch.cat([acts, targets], 1)
    encoder_before = mmcs_ground_truth(ensemble.W_enc[0].t(), model.features)["mmcs_ground_truth"]
    for step in range(rows // batch):
        trainer.step(data[step * batch : (step + 1) * batch])
    recovery = mmcs_ground_truth(ensemble.W_dec[0], model.target_features)
    assert recovery["mmcs_ground_truth"] >= 0.9, recovery
    # the encoder turned towards the input's features (in superposition it is no copy of them)
    encoder = mmcs_ground_truth(ensemble.W_enc[0].t(), model.features)["mmcs_ground_truth"]
    assert encoder >= encoder_before + 0.1, (encoder_before, encoder)
    with torch.no_grad():
        out = ensemble(data[:4096] * ensemble.input_scale)
    assert float(out.fvu[0]) < 0.25 and float(out.l0[0]) < 8
