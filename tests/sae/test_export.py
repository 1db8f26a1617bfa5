"""Exports load back (ours and SAELens v6) and reproduce the trained module on raw activations."""

import json

import pytest
import sae_lens
import torch

from dictsweep import load_dictionary
from dictsweep.config import TrainConfig
from dictsweep.sae import Member, build_ensemble
from dictsweep.sae.export import member_files
from dictsweep.store.models import export_names
from dictsweep.train.loop import EnsembleTrainer

D_MODEL, N_LATENTS, SCALE = 12, 40, 3.5


pytestmark = pytest.mark.usefixtures("one_thread")


MEMBERS = {"relu": [Member(lr=3e-3, seed=4, l1_coef=0.5), Member(lr=3e-3, seed=5, l1_coef=2.0)],
           "jumprelu": [Member(lr=3e-3, seed=4, l1_coef=0.05), Member(lr=3e-3, seed=5, l1_coef=0.2)],
           "topk": [Member(lr=3e-3, seed=4, k=3), Member(lr=3e-3, seed=5, k=6)],
           "batchtopk": [Member(lr=3e-3, seed=4, k=3), Member(lr=3e-3, seed=5, k=6)]}
SAELENS_ARCHITECTURE = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "batchtopk": "jumprelu"}


def trained(architecture):
    generator = torch.Generator().manual_seed(0)
    ensemble = build_ensemble(architecture, D_MODEL, N_LATENTS, MEMBERS[architecture])
    ensemble.input_scale.fill_(SCALE)
    trainer = EnsembleTrainer(ensemble, TrainConfig(tokens=3200, batch_rows=64, lr_warmup_steps=2), 50)
    for _ in range(50):
        trainer.step(torch.randn(64, D_MODEL, generator=generator) + 2.0)
    # move the biases away from zero so that folding the scale into them is exercised
    with torch.no_grad():
        ensemble.b_enc.add_(0.05)
        ensemble.b_dec.add_(0.3)
    return ensemble, trainer


def dense_latents(ensemble, x):
    """Inference latents `[K, B, n_latents]` of raw activations, in raw units."""
    values, indices = ensemble.encode(x * SCALE)
    return (values if indices is None else ensemble.densify(values, indices)) / SCALE


def write(folder, files):
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


@pytest.mark.parametrize("architecture", sorted(MEMBERS))
def test_export_reproduces_trained_module(tmp_path, architecture):
    ensemble, trainer = trained(architecture)
    x = torch.randn(100, D_MODEL, generator=torch.Generator().manual_seed(1)) + 2.0
    with torch.no_grad():  # no gradients: batchtopk keeps what is above its learned threshold
        out = ensemble(x * SCALE)
    for index in range(ensemble.n_members):
        folder = tmp_path / f"member{index}"
        write(folder, member_files(ensemble, index, trainer.firing.log10_frequency()[index],
                                   {"model_name": "toy", "hook_name": "h", "dictsweep": {"seed": index}}))
        loaded = load_dictionary(str(folder))
        torch.testing.assert_close(loaded(x), out.sae_out[index] / SCALE, rtol=1e-5, atol=1e-5)
        latents = loaded.encode(x)
        assert float((latents > 0).sum(-1).float().mean()) == pytest.approx(float(out.l0[index]))
        config = json.loads((folder / "cfg.json").read_text())
        assert config["normalize_activations"] == "none" and config["metadata"]["hook_name"] == "h"
        assert config["architecture"] == SAELENS_ARCHITECTURE[architecture]
        assert loaded.sparsity.shape == (N_LATENTS,)


@pytest.mark.parametrize("architecture", sorted(MEMBERS))
def test_saelens_loads_export(tmp_path, architecture):
    ensemble, trainer = trained(architecture)
    folder = tmp_path / "sae"
    # the names a GPT-2 harvest from a local Hugging Face cache folder exports
    source = {"model": "/home/someone/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/607a30d",
              "model_type": "gpt2", "hook": "transformer.h.3"}
    write(folder, member_files(ensemble, 1, trainer.firing.log10_frequency()[1], export_names(source)))
    sae = sae_lens.SAE.load_from_disk(str(folder))
    assert sae.cfg.metadata.model_name == "openai-community/gpt2" and sae.cfg.metadata.hook_name == "transformer.h.3"
    assert json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name_transformer_lens"] == \
        "blocks.3.hook_resid_post"
    x = torch.randn(50, D_MODEL, generator=torch.Generator().manual_seed(2)) + 2.0
    with torch.no_grad():
        expected = ensemble(x * SCALE).sae_out[1] / SCALE
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode(x), dense_latents(ensemble, x)[1], rtol=1e-5, atol=1e-5)
    assert sae.cfg.d_sae == N_LATENTS and sae.cfg.metadata.sae_lens_version >= "6.0.0"
